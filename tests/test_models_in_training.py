"""Models x attentions train two steps in the sharded train step (8 fake devices).

The encoder classifier, the decoder LM and memory x attention have their own files
(test_attention_in_training.py, test_lm_attention.py, test_lm_memory_attention.py); this
one covers the other two kinds of config.model.kind:
- 'dual_encoder' (LRA Retrieval): `configs/lra/retrieval.py:smoke,attention=NAME`, two
  documents of 64 bytes through the shared tower (65 positions with the CLS token).
- 'segmented' (the recurrent-memory classifier): `configs/lra/listops.py:smoke,
  attention=NAME,segment=16`, 64 tokens read 16 at a time with 8 memory vectors, so each
  attention call spans 24 positions.
Both at tiny sizes (1 layer, width 16, 2 heads, MLP 32, batch 8) on a data=2, fsdp=2,
tensor=2 mesh, with each attention's smoke kwargs sized by the config for its span. The
batches are random token ids of the TaskSpec's fields, each row right-padded with 0 to a
random length (a padded row's last segment may then hold no real token at all).
"""

import jax
import numpy as np
import pytest

from configs.lra import listops as listops_config
from configs.lra import retrieval as retrieval_config
from efficient_transformers import attention, models
from efficient_transformers.data import tasks
from efficient_transformers.training import config_lib, sharding, state, train_lib

# Independent tests, each a compile: the xdist workers share them one by one (conftest.py).
pytestmark = pytest.mark.spread

LENGTH = 64  # Tokens per input (per document for the dual encoder).
SEGMENT = 16
# One layer, not the smoke configs' two: the same attention code, and the cases' time is
# XLA compiling the step (measured ~7 s of CPU a case with one layer, ~8.5 s with two).
NUM_LAYERS = 1


def small(c):
  c.model.num_layers = NUM_LAYERS
  c.model.emb_dim = c.model.qkv_dim = 16
  c.model.num_heads = 2
  c.model.mlp_dim = 32
  c.model.classifier_dim = 16
  c.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2


def dual_encoder_config(name):
  c = retrieval_config.get_config(f"smoke,attention={name}")
  small(c)
  c.data.max_length = c.model.max_length = LENGTH
  # The smoke config sized the length-dependent kwargs (Linformer's, Sinkhorn's,
  # Synthesizer's max_length) for its 256 bytes + CLS; resize them for this length.
  c.model.attention_kwargs = config_lib.attention_defaults(
    name, smoke=True, sequence_length=LENGTH + 1
  )
  return c


def segmented_config(name):
  c = listops_config.get_config(f"smoke,attention={name},segment={SEGMENT}")
  small(c)
  assert c.model.max_length == LENGTH  # Four segments.
  return c


CONFIGS = {"dual_encoder": dual_encoder_config, "segmented": segmented_config}


def synthetic_batch(spec, batch_size, rng):
  """A batch of spec.fields: ids in [1, vocab) right-padded with 0, targets in [0, classes)."""
  batch = {}
  for key, (shape, dtype) in spec.fields.items():
    if key == "targets":
      batch[key] = rng.integers(0, spec.num_classes, size=(batch_size, *shape)).astype(dtype)
      continue
    (length,) = shape
    ids = rng.integers(1, spec.vocab_size, size=(batch_size, length))
    lengths = rng.integers(length // 4, length + 1, size=(batch_size, 1))
    batch[key] = np.where(np.arange(length) < lengths, ids, 0).astype(dtype)
  return batch


# The dual encoder is the classifier's encoder run once over both documents: every
# attention trains in that encoder already (test_attention_in_training.py). Here, the
# attentions whose kwargs the config sizes for the span (Linformer, Sinkhorn,
# Synthesizer), BigBird (a random layout per row, and the rows doubled) and softmax;
# the segmented classifier (short segments, a last segment that may be all padding)
# with every attention.
DUAL_ENCODER_ATTENTIONS = ("softmax", "linformer", "sinkhorn", "synthesizer", "bigbird")
CASES = [("dual_encoder", name) for name in DUAL_ENCODER_ATTENTIONS] + [
  ("segmented", name) for name in attention.available()
]


@pytest.mark.parametrize("kind,name", CASES)
def test_model_trains_two_sharded_steps(kind, name):
  config = CONFIGS[kind](name)
  assert config.model.kind == kind and config.model.attention == name
  spec = tasks.describe(config)
  setup = train_lib._build(config, spec)
  assert setup.input_names == models.MODELS[kind].input_names
  step_fn = train_lib._compile_train_step(config, spec, setup)
  train_state = state.init_state(setup)
  before = jax.device_get(train_state["params"])
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = sharding.global_batch(
      synthetic_batch(spec, config.batch_size, rng), setup.batch_sharding
    )
    train_state, metrics = step_fn(train_state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  after = jax.device_get(train_state["params"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after))
  assert sum(changed) > len(changed) // 2  # The attention's parameters among them train.
