"""Position schemes: RoPE, ALiBi and axial, against hand-computed references, in every model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention.dot_product import dot_product_attention
from efficient_transformers.attention.local import local_attention, local_pattern
from efficient_transformers.attention.memory_efficient import memory_efficient_attention
from efficient_transformers.attention.softmax import softmax_attention
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import TokenEmbedding, positions
from efficient_transformers.models.decoder import DecoderLM
from efficient_transformers.models.encoder import Encoder
from tests.attention_reference import cotangent, dense_attention, make_mask, random_qkv


def hand_rotation(x: np.ndarray, position: int, base: float = 10_000.0) -> np.ndarray:
  """RoPE of one vector x [d] at `position`, written as complex multiplication.

  Feature i and feature i + d/2 form the complex number x_i + 1j * x_{i+d/2},
  multiplied by exp(1j * position * base^(-2i/d)).
  """
  d = x.shape[-1]
  half = d // 2
  out = np.empty(d)
  for i in range(half):
    z = complex(x[i], x[i + half]) * np.exp(1j * position * base ** (-2 * i / d))
    out[i], out[i + half] = z.real, z.imag
  return out


def test_rope_equals_a_hand_computed_rotation():
  x = np.random.default_rng(0).standard_normal((1, 5, 2, 8)).astype(np.float32)
  got = np.asarray(positions.rotate(jnp.asarray(x), offset=3))
  for t in range(5):
    for h in range(2):
      np.testing.assert_allclose(got[0, t, h], hand_rotation(x[0, t, h], 3 + t), atol=1e-5)
  # `at` places rows at arbitrary positions.
  at = [7, 0, 2, 11, 4]
  got = np.asarray(positions.rotate(jnp.asarray(x), at=at))
  for t, p in enumerate(at):
    np.testing.assert_allclose(got[0, t, 1], hand_rotation(x[0, t, 1], p), atol=1e-5)


def test_rope_position_zero_is_the_identity_and_norms_are_kept():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 3, 16)), jnp.float32)
  np.testing.assert_allclose(positions.rotate(x[:, :1]), x[:, :1], atol=1e-7)
  np.testing.assert_allclose(
    jnp.linalg.norm(positions.rotate(x, offset=100), axis=-1),
    jnp.linalg.norm(x, axis=-1),
    rtol=1e-5,
  )


@pytest.mark.parametrize("shift", [1, 17, 1000])
def test_rope_is_relative_shifting_every_position_leaves_scores_unchanged(shift):
  q, k, _ = random_qkv(2, 12, head_dim=16)
  scores = jnp.einsum("bqhd,bkhd->bhqk", positions.rotate(q), positions.rotate(k))
  shifted = jnp.einsum(
    "bqhd,bkhd->bhqk", positions.rotate(q, offset=shift), positions.rotate(k, offset=shift)
  )
  np.testing.assert_allclose(shifted, scores, atol=2e-4)
  # And the rotation does something: the scores differ from unrotated ones.
  assert float(jnp.abs(scores - jnp.einsum("bqhd,bkhd->bhqk", q, k)).max()) > 0.1


def test_rope_needs_an_even_head_dim():
  with pytest.raises(ConfigError, match="even head_dim"):
    positions.rotate(jnp.zeros((1, 2, 1, 3)))


def test_alibi_slopes_follow_the_paper():
  np.testing.assert_allclose(positions.alibi_slopes(8), [2.0**-i for i in range(1, 9)])
  # 6 heads: the 4-head slopes, then every other one of the 8-head slopes.
  np.testing.assert_allclose(
    positions.alibi_slopes(6), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
  )


def alibi_reference(heads, q_len, kv_len):
  """-slope_h |i - j| by loops, query i at key position i + kv_len - q_len."""
  slopes = positions.alibi_slopes(heads)
  bias = np.zeros((heads, q_len, kv_len), np.float32)
  for h in range(heads):
    for i in range(q_len):
      for j in range(kv_len):
        bias[h, i, j] = -slopes[h] * abs(i + kv_len - q_len - j)
  return bias


def test_alibi_bias_for_matches_loops():
  np.testing.assert_allclose(
    positions.alibi_bias_for(positions.alibi_slopes(3), 4, 7), alibi_reference(3, 4, 7)
  )


def _values_and_grads(fn, q, k, v):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(cotangent(out))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "right_padding"])
@pytest.mark.parametrize("variant", ["softmax", "dot_product", "memory_efficient", "local"])
def test_alibi_in_each_kernel_equals_dense_attention_with_the_bias(variant, causal, mask_kind):
  length = 48
  q, k, v = random_qkv(3, length)
  mask = make_mask(mask_kind, length)
  slopes = positions.alibi_slopes(q.shape[2])
  bias = alibi_reference(q.shape[2], length, length)[None]
  pattern = None
  if variant == "softmax":
    fn = lambda q, k, v: softmax_attention(q, k, v, mask=mask, causal=causal, alibi_slopes=slopes)
  elif variant == "dot_product":
    fn = lambda q, k, v: dot_product_attention(
      q, k, v, mask=mask, causal=causal, implementation="xla", alibi_slopes=slopes
    )
  elif variant == "memory_efficient":
    fn = lambda q, k, v: memory_efficient_attention(
      q, k, v, mask=mask, causal=causal, query_chunk_size=16, key_chunk_size=8, alibi_slopes=slopes
    )
  else:
    pattern = local_pattern(length, length, block_size=8, num_neighbors=1, causal=causal)
    fn = lambda q, k, v: local_attention(
      q, k, v, mask=mask, causal=causal, block_size=8, num_neighbors=1, alibi_slopes=slopes
    )
  ref = lambda q, k, v: dense_attention(
    q, k, v, mask=mask, causal=causal, pattern=pattern, bias=bias
  )
  out, grads = _values_and_grads(fn, q, k, v)
  ref_out, ref_grads = _values_and_grads(ref, q, k, v)
  np.testing.assert_allclose(out, ref_out, atol=2e-5)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, atol=5e-5)
  # The bias matters: without it the output moves.
  plain = dense_attention(q, k, v, mask=mask, causal=causal, pattern=pattern)
  assert float(jnp.abs(plain - ref_out).max()) > 1e-2


def _module(name, position, **kwargs):
  return attention.make(
    name,
    in_features=16,
    num_heads=2,
    head_dim=8,
    causal=True,
    position=position,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


@pytest.mark.parametrize("name", ["softmax", "performer", "linear", "local"])
def test_rope_module_rotates_queries_and_keys_before_the_kernel(name):
  """The module with position='rope' equals its kernel on hand-rotated q and k."""
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16)), jnp.float32)
  kwargs = {"block_size": 8} if name == "local" else {}
  module = _module(name, "rope", **kwargs)
  q, k, v = module.query(x), module.key(x), module.value(x)
  rq = np.zeros(q.shape, np.float32)
  rk = np.zeros(k.shape, np.float32)
  for b in range(2):
    for t in range(16):
      for h in range(2):
        rq[b, t, h] = hand_rotation(np.asarray(q[b, t, h]), t)
        rk[b, t, h] = hand_rotation(np.asarray(k[b, t, h]), t)
  expected = module.out(
    module.attend(jnp.asarray(rq), jnp.asarray(rk), v, mask=None, deterministic=True)
  )
  np.testing.assert_allclose(module(x), expected, atol=1e-4)
  unrotated = module.out(module.attend(q, k, v, mask=None, deterministic=True))
  assert float(jnp.abs(unrotated - expected).max()) > 1e-3


def test_a_variant_without_the_option_is_refused_by_name():
  with pytest.raises(ConfigError, match=r"'synthesizer' does not take position='rope'"):
    _module("synthesizer", "rope", max_length=16)
  with pytest.raises(ConfigError, match=r"'performer' does not take position='alibi'.*local"):
    _module("performer", "alibi")
  with pytest.raises(ConfigError, match="position must be None, 'rope', 'alibi' or 'relative'"):
    _module("softmax", "sinusoidal")
  with pytest.raises(ConfigError, match="positional must be one of"):
    TokenEmbedding(10, 8, max_length=4, positional="rotary", rngs=nnx.Rngs(0))


def test_axial_positions_have_the_documented_parameter_count_and_are_distinct():
  assert positions.axial_shape(4096) == (64, 64)
  assert positions.axial_shape(1000) == (32, 32)
  axial = positions.AxialPositions(4096, 512, rngs=nnx.Rngs(0))
  count = sum(p.size for p in jax.tree.leaves(nnx.state(axial, nnx.Param)))
  assert count == 64 * 256 + 64 * 256 == 32_768
  table = np.asarray(axial(4096))
  assert table.shape == (4096, 512)
  # Position p = r * 64 + c is the row embedding of r next to the column embedding of c.
  np.testing.assert_array_equal(table[130, :256], np.asarray(axial.rows[...])[2])
  np.testing.assert_array_equal(table[130, 256:], np.asarray(axial.columns[...])[2])
  assert len(np.unique(table.round(6), axis=0)) == 4096
  np.testing.assert_array_equal(axial(5, offset=128), table[128:133])


def _lm(positional, attention_name="softmax", **kwargs):
  return DecoderLM(
    num_layers=1,
    emb_dim=16,
    num_heads=2,
    qkv_dim=16,
    mlp_dim=32,
    segment_length=32,
    dropout_rate=0.0,
    memory="none",
    attention_name=attention_name,
    attention_kwargs=kwargs,
    positional=positional,
    rngs=nnx.Rngs(0),
  )


@pytest.mark.parametrize(
  "positional,attention_name,kwargs",
  [
    ("rope", "performer", {"num_features": 16}),
    ("rope", "linear", {}),
    ("alibi", "local", {"block_size": 8}),
    ("alibi", "memory_efficient", {"query_chunk_size": 8, "key_chunk_size": 8}),
    ("axial", "softmax", {}),
    ("learned", "softmax", {}),
    ("none", "softmax", {}),
  ],
)
def test_lm_positions_stay_causal_and_change_the_output(positional, attention_name, kwargs):
  ids = jnp.asarray(np.random.default_rng(5).integers(1, 257, (2, 32)))
  lm = _lm(positional, attention_name, **kwargs)
  logits, _, _ = lm(ids, {})
  changed, _, _ = lm(ids.at[:, 20:].set(7), {})
  np.testing.assert_allclose(changed[:, :20], logits[:, :20], atol=1e-5)
  # The scheme is used: the same model with sinusoidal positions (the same
  # parameters where it has no position parameters of its own) differs.
  other, _, _ = _lm("sinusoidal", attention_name, **kwargs)(ids, {})
  assert float(jnp.abs(other - logits).max()) > 1e-4


def test_lm_memory_stacks_refuse_another_position_scheme_by_name():
  with pytest.raises(
    ConfigError, match=r"positional='learned' does not work with memory='transformer_xl'"
  ):
    DecoderLM(
      num_layers=1,
      emb_dim=16,
      num_heads=2,
      qkv_dim=16,
      mlp_dim=32,
      segment_length=8,
      memory="transformer_xl",
      mem_len=8,
      positional="learned",
      rngs=nnx.Rngs(0),
    )
  with pytest.raises(ConfigError, match=r"positional='rope' does not work with memory='rmt'"):
    DecoderLM(
      num_layers=1,
      emb_dim=16,
      num_heads=2,
      qkv_dim=16,
      mlp_dim=32,
      segment_length=8,
      memory="rmt",
      num_memory_tokens=2,
      positional="rope",
      rngs=nnx.Rngs(0),
    )


@pytest.mark.parametrize("positional", ["rope", "alibi", "axial"])
def test_encoder_takes_every_position_scheme(positional):
  encoder = Encoder(
    vocab_size=20,
    max_length=16,
    num_layers=1,
    emb_dim=16,
    num_heads=2,
    qkv_dim=16,
    mlp_dim=32,
    positional=positional,
    rngs=nnx.Rngs(0),
  )
  ids = jnp.asarray(np.random.default_rng(6).integers(1, 20, (2, 16)))
  out, _ = encoder(ids)
  assert out.shape == (2, 16, 16) and bool(jnp.isfinite(out).all())
  # Rolling the tokens changes more than their order (positions are seen; a
  # reversal would not do for ALiBi, whose bidirectional bias is symmetric).
  rolled, _ = encoder(jnp.roll(ids, 3, axis=1))
  assert float(jnp.abs(jnp.roll(rolled, -3, axis=1) - out).max()) > 1e-4
