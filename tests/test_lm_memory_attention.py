"""The decoder LM's memories with every attention that can serve them.

Transformer-XL's memory is read as the context of each layer's attention, so it
works with every causal attention (`attention.available(causal=True)`); RMT
takes the attentions with an additive bias. Sizes: one layer of width 32,
segments of 32 after a memory of 32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.lm import byte_lm as byte_lm_config
from efficient_transformers.errors import ConfigError
from efficient_transformers.models import DecoderLM
from efficient_transformers.training import state
from tests.test_lm_attention import CAUSAL, random_bytes, train_two_sharded_steps

# Independent tests: the xdist workers share them one by one (tests/conftest.py).
pytestmark = pytest.mark.spread


def xl_config(name: str, memory: str = "transformer_xl"):
  """The smoke LM with a memory: segments of 32 after a memory of 32 (64 keys)."""
  c = byte_lm_config.get_config(f"smoke,attention={name},memory={memory}")
  c.model.num_layers = 1
  c.model.emb_dim = c.model.qkv_dim = 32
  c.model.num_heads = 2
  c.model.mlp_dim = 64
  c.model.segment_length = 32
  c.model.mem_len = c.model.eval_mem_len = 32
  c.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


@pytest.mark.parametrize("name", CAUSAL)
def test_transformer_xl_memory_with_every_causal_attention_reads_the_past_only(name):
  """Two segments through the memory: the second segment's logits depend on the
  first (the memory is read) and never on its own later bytes."""
  config = xl_config(name)
  model = state.build_model(config.model, vocab_size=257, num_classes=0, rngs=nnx.Rngs(0))
  assert model.memory_kind == "transformer_xl"
  graphdef, params = nnx.split(model)

  @jax.jit
  def second_segment(params, ids):
    lm = nnx.merge(graphdef, params)
    memory = lm(ids[:, :32], lm.init_memory(ids.shape[0]))[1]
    return lm(ids[:, 32:], memory)[0]

  ids = random_bytes(4, (2, 64))
  before = np.asarray(second_segment(params, jnp.asarray(ids)))
  t = 20
  later = ids.copy()
  later[:, 32 + t + 1 :] = random_bytes(5, (2, 64 - 32 - t - 1))
  after = np.asarray(second_segment(params, jnp.asarray(later)))
  np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], atol=1e-5)
  earlier = ids.copy()
  earlier[:, :32] = random_bytes(6, (2, 32))
  moved = np.asarray(second_segment(params, jnp.asarray(earlier)))
  assert np.abs(moved - before).max() > 1e-3  # The memory carries the first segment.


@pytest.mark.parametrize(
  "name,memory",
  [(name, "transformer_xl") for name in CAUSAL]
  + [("dot_product", "rmt"), ("memory_efficient", "compressive")],
)
def test_memory_with_each_attention_trains_in_the_sharded_step(name, memory):
  config = xl_config(name, memory)
  if memory == "compressive":
    config.model.cmem_len, config.model.compression_rate = 16, 2
  if memory == "rmt":
    config.model.mem_len = config.model.eval_mem_len = 0
  train_two_sharded_steps(config)


def test_a_memory_an_attention_cannot_serve_is_refused_by_name():
  with pytest.raises(ConfigError, match="memory=rmt needs an attention that takes an additive"):
    byte_lm_config.get_config("smoke,attention=local,memory=rmt")
  sizes = dict(num_layers=1, emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, segment_length=16)
  with pytest.raises(ConfigError, match="memory 'rmt' needs an attention that takes an additive"):
    DecoderLM(
      memory="rmt", attention_name="performer", num_memory_tokens=2, rngs=nnx.Rngs(0), **sizes
    )
  with pytest.raises(ConfigError, match="positional='relative' .* needs attention 'softmax'"):
    DecoderLM(
      memory="transformer_xl",
      attention_name="performer",
      positional="relative",
      mem_len=4,
      rngs=nnx.Rngs(0),
      **sizes,
    )
  with pytest.raises(ConfigError, match="positional='sinusoidal' does not work with memory"):
    DecoderLM(
      memory="transformer_xl", positional="sinusoidal", mem_len=4, rngs=nnx.Rngs(0), **sizes
    )
