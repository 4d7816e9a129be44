"""Token-by-token decoding with O(1) state: the kernelized attentions' RNN form and the LM.

Each is checked against an independent reference: the RNN step of linear attention
against a naive loop over the causal sums, every stepping mixer and attention
against its own full (parallel) pass, and the LM's `decode` against `__call__`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import linear
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import positions
from efficient_transformers.models import mixing
from efficient_transformers.models.decoder import DecoderLM

STEPPING = ("lstm", "gru", "s4d", "lru", "s5", "linear", "performer")
KWARGS = {"performer": {"num_features": 16}, "s4d": {"state_size": 8}, "lru": {"state_size": 8}}
SEGMENT = 12


def lm(name, *, positional="none", segment_length=SEGMENT, **overrides):
  sizes = dict(num_layers=2, emb_dim=32, num_heads=4, qkv_dim=32, mlp_dim=64)
  return DecoderLM(
    **{**sizes, **overrides},
    segment_length=segment_length,
    memory="none",
    attention_name=name,
    attention_kwargs=KWARGS.get(name, {}),
    positional=positional,
    dropout_rate=0.0,
    rngs=nnx.Rngs(0),
  )


@nnx.jit
def decode(model, ids, state):
  return model.decode(ids, state)


def ids_with_padding(length=SEGMENT, seed=1):
  ids = jax.random.randint(jax.random.key(seed), (2, length), 1, 257)
  return ids.at[1, length - 4 :].set(0)  # Right padding, as the LM streams have.


def test_linear_attention_step_equals_a_naive_loop():
  b, h, m, d, length = 2, 3, 5, 4, 7
  keys = jax.random.split(jax.random.key(0), 3)
  phi_q = jax.random.uniform(keys[0], (b, length, h, m))
  phi_k = jax.random.uniform(keys[1], (b, length, h, m))
  v = jax.random.normal(keys[2], (b, length, h, d))
  state = (jnp.zeros((b, h, m, d)), jnp.zeros((b, h, m)))
  outs = []
  for t in range(length):
    out, state = linear.linear_attention_step(phi_q[:, t], phi_k[:, t], v[:, t], state)
    outs.append(out)
  pq, pk, vv = (np.asarray(a, np.float64) for a in (phi_q, phi_k, v))
  expected = np.zeros((b, length, h, d))
  for i in range(length):
    weights = np.einsum("bhm,bjhm->bhj", pq[:, i], pk[:, : i + 1])  # keys j <= i
    expected[:, i] = (
      np.einsum("bhj,bjhd->bhd", weights, vv[:, : i + 1]) / weights.sum(-1)[..., None]
    )
  np.testing.assert_allclose(jnp.stack(outs, 1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "performer"])
@pytest.mark.parametrize("position", [None, "rope"])
def test_kernelized_attention_step_equals_its_causal_pass(name, position):
  module = attention.make(
    name,
    in_features=16,
    num_heads=2,
    head_dim=8,
    causal=True,
    position=position,
    rngs=nnx.Rngs(0),
    **KWARGS.get(name, {}),
  )
  x = jax.random.normal(jax.random.key(2), (2, 9, 16))
  full = module(x)
  state = module.init_state(2)
  ys = []
  for t in range(x.shape[1]):
    y_t, state = module.step(x[:, t], state)
    ys.append(y_t)
  np.testing.assert_allclose(jnp.stack(ys, 1), full, atol=2e-5)
  assert int(state["position"]) == x.shape[1]
  with pytest.raises(ConfigError, match="causal=True"):
    attention.make(name, in_features=16, num_heads=2, head_dim=8, rngs=nnx.Rngs(0)).init_state(1)


def test_rope_at_a_traced_position_equals_the_static_one():
  x = jax.random.normal(jax.random.key(3), (2, 3, 2, 8))
  traced = jax.jit(lambda x, p: positions.rotate(x, offset=p))(x, jnp.int32(37))
  np.testing.assert_allclose(traced, positions.rotate(x, offset=37), atol=1e-5)


@pytest.mark.parametrize("name", STEPPING)
def test_lm_decode_equals_the_full_pass(name):
  positional = "rope" if mixing.is_attention(name) else "sinusoidal"
  model = lm(name, positional=positional)
  ids = ids_with_padding()
  full, _, _ = model(ids, {})
  logits, state = decode(model, ids, model.init_decode_state(2))
  real = np.asarray(ids != 0)
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full)[real], atol=5e-5)
  assert int(state["position"]) == SEGMENT


@pytest.mark.parametrize("name", ["lru", "gru", "linear"])
def test_padding_leaves_the_state_unchanged(name):
  model = lm(name)
  ids = ids_with_padding()
  _, padded = decode(model, ids, model.init_decode_state(2))
  _, unpadded = decode(model, ids[:, : SEGMENT - 4], model.init_decode_state(2))
  row = lambda tree: [np.asarray(a[1]) for a in jax.tree.leaves(tree["layers"]) if a.ndim]
  for a, b in zip(row(padded), row(unpadded), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The real row went on: its state is not the 8-token one.
  first = lambda tree: np.asarray(jax.tree.leaves(tree["layers"])[0][0])
  assert not np.allclose(first(padded), first(unpadded))


@pytest.mark.parametrize("name", ["s5", "lstm", "performer"])
def test_decoding_goes_on_past_the_segment_with_a_state_of_fixed_size(name):
  """A stream of 3 segments decoded token by token equals the full pass of a model
  trained on segments that long (positions 'none': the same parameters)."""
  short, long = lm(name, segment_length=SEGMENT), lm(name, segment_length=3 * SEGMENT)
  ids = jax.random.randint(jax.random.key(4), (2, 3 * SEGMENT), 1, 257)
  logits, state = decode(short, ids, short.init_decode_state(2))
  full, _, _ = long(ids, {})
  np.testing.assert_allclose(logits, full, atol=5e-5)
  _, state_after_one = decode(short, ids[:, :SEGMENT], short.init_decode_state(2))
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert shapes(state) == shapes(state_after_one)


def test_what_cannot_decode_is_named():
  with pytest.raises(
    ConfigError,
    match="'softmax' has no token-by-token form.*: linear, performer, gru, lru, lstm, s4d, s5\\.",
  ):
    lm("softmax").init_decode_state(1)
  with pytest.raises(ConfigError, match="'conv' has no token-by-token form"):
    lm("conv").init_decode_state(1)
  with pytest.raises(ConfigError, match="positional='learned'.*sinusoidal, rope"):
    lm("lru", positional="learned").init_decode_state(1)
  with pytest.raises(ConfigError, match="scan_layers=True"):
    lm("lru", scan_layers=True).init_decode_state(1)
  xl = DecoderLM(
    num_layers=1,
    emb_dim=16,
    num_heads=2,
    qkv_dim=16,
    mlp_dim=32,
    segment_length=8,
    memory="transformer_xl",
    mem_len=8,
    rngs=nnx.Rngs(0),
  )
  with pytest.raises(ConfigError, match="memory='transformer_xl'.*segment_length=1"):
    xl.init_decode_state(1)
  with pytest.raises(ConfigError) as info:
    lm("linear", positional="learned").embed.embed_at(jnp.ones((1,), jnp.int32), jnp.int32(0))
  assert info.value.argument == "positional"
