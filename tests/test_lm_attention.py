"""The decoder LM over every attention that can be causal, through the shared stack.

Every test parametrizes over `attention.available(causal=True)`, so a newly
registered causal variant is tested here without a line added. Sizes: the
smoke LM config (its per-variant kwargs, segments of 64) cut to one layer of
width 32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.lm import byte_lm as byte_lm_config
from efficient_transformers import attention
from efficient_transformers.data import tasks
from efficient_transformers.errors import ConfigError
from efficient_transformers.models import DecoderLM
from efficient_transformers.training import sharding, state, train_lib

# Independent tests: the xdist workers share them one by one (tests/conftest.py).
pytestmark = pytest.mark.spread

CAUSAL = attention.available(causal=True)


def lm_config(name: str):
  c = byte_lm_config.get_config(f"smoke,attention={name},memory=none")
  c.model.num_layers = 1
  c.model.emb_dim = c.model.qkv_dim = 32
  c.model.num_heads = 2
  c.model.mlp_dim = 64
  c.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


def random_bytes(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).integers(1, 257, size=shape, dtype=np.int32)


def test_the_causal_variants_are_the_ones_the_lm_should_take():
  assert CAUSAL == sorted(
    "dot_product linear local longformer memory_efficient performer reformer sinkhorn "
    "softmax sparse synthesizer".split()
  )


@pytest.mark.parametrize("name", CAUSAL)
def test_later_bytes_leave_earlier_logits_unchanged(name):
  config = lm_config(name)
  model = state.build_model(config.model, vocab_size=257, num_classes=0, rngs=nnx.Rngs(0))
  assert model.memory_kind == "none"
  graphdef, params = nnx.split(model)

  @jax.jit
  def logits(params, ids):
    # Both calls start from the same state, so random hashes or features match.
    lm = nnx.merge(graphdef, params)
    return lm(ids, lm.init_memory(ids.shape[0]))[0]

  length, t = config.model.segment_length, 37  # t: inside a block of every variant.
  ids = random_bytes(0, (2, length))
  changed = ids.copy()
  changed[:, t + 1 :] = random_bytes(1, (2, length - t - 1))
  before, after = np.asarray(logits(params, ids)), np.asarray(logits(params, changed))
  np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], atol=1e-5)
  assert np.abs(after[:, t + 1 :] - before[:, t + 1 :]).max() > 1e-3  # Later ones do move.


@pytest.mark.parametrize("name", CAUSAL)
def test_trains_two_steps_in_the_sharded_step(name):
  train_two_sharded_steps(lm_config(name))


@pytest.mark.parametrize(
  "name,positional", [("performer", "rope"), ("local", "alibi"), ("softmax", "axial")]
)
def test_position_schemes_train_in_the_sharded_step(name, positional):
  config = lm_config(name)
  config.model.positional = positional
  train_two_sharded_steps(config)


def train_two_sharded_steps(config):
  spec = tasks.describe(config)
  setup = train_lib._build(config, spec)
  step_fn = train_lib._compile_train_step(config, spec, setup)
  train_state = state.init_state(setup)
  before = jax.device_get(train_state["params"])
  length = spec.fields["inputs"][0][0]
  for i in range(2):
    tokens = random_bytes(i, (config.batch_size, length + 1))
    batch = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "reset": np.full((config.batch_size,), i == 0),
    }
    train_state, metrics = step_fn(train_state, sharding.global_batch(batch, setup.batch_sharding))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  after = jax.device_get(train_state["params"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after))
  assert sum(changed) > len(changed) // 2


@pytest.mark.parametrize("name", attention.available(causal=False))
def test_a_variant_that_cannot_be_causal_is_refused_by_name(name):
  with pytest.raises(ConfigError, match=rf"attention={name!r} is not a causal attention"):
    byte_lm_config.get_config(f"smoke,attention={name}")
  # The library says the same in its own terms: the argument, not a config key.
  with pytest.raises(ConfigError, match=rf"attention {name!r} cannot be causal \(causal=True"):
    DecoderLM(
      num_layers=1,
      emb_dim=16,
      num_heads=2,
      qkv_dim=16,
      mlp_dim=32,
      segment_length=16,
      memory="none",
      attention_name=name,
      rngs=nnx.Rngs(0),
    )


def test_softmax_keeps_transformer_xl_and_others_default_to_no_memory():
  assert byte_lm_config.get_config("smoke").model.memory == "transformer_xl"
  assert byte_lm_config.get_config("smoke").model.positional == "relative"
  xl = byte_lm_config.get_config("smoke,attention=performer,memory=transformer_xl")
  assert xl.model.positional == "rope"
  assert byte_lm_config.get_config("smoke,attention=performer").model.memory == "none"
  config = byte_lm_config.get_config("smoke,attention=local")
  assert config.model.attention_kwargs.block_size == 16  # The smoke size, fitting 64.


def test_plain_decoder_equals_its_blocks_by_hand():
  # memory="none" is the shared Stack: embedding, causal blocks, final norm, head.
  model = DecoderLM(
    num_layers=2,
    emb_dim=16,
    num_heads=2,
    qkv_dim=16,
    mlp_dim=32,
    segment_length=8,
    memory="none",
    attention_name="local",
    attention_kwargs={"block_size": 4},
    rngs=nnx.Rngs(0),
  )
  ids = jnp.asarray(random_bytes(3, (2, 8)))
  x = model.embed(ids)
  for block in model.stack.blocks:
    assert block.attention.causal and block.attention.registered_name == "local"
    x = block(x, mask=ids != 0)
  expected = model.head(model.stack.final_norm(x))
  np.testing.assert_allclose(model(ids, {})[0], expected, atol=1e-5)
