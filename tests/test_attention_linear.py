"""Linear attention (elu + 1 features) against a naive L x L reference.

The reference builds the full matrix phi(q) phi(k)^T from the definition,
masks it (padding, causality) and normalizes its rows; the library must
match it in values and gradients without ever forming that matrix.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import linear as linear_lib
from efficient_transformers.errors import ConfigError
from tests import attention_reference as reference

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 40, 2, 8


def reference_linear_attention(q, k, v, *, mask=None, causal=False):
  """phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j) over an explicit L x L matrix."""
  phi = lambda x: jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  q_len, kv_len = q.shape[1], k.shape[1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))
  keep = np.ones((1, 1, q_len, kv_len), bool)
  if causal:
    keep = keep & np.tril(np.ones((q_len, kv_len), bool))
  if mask is not None:
    keep = keep & mask[:, None, None, :]
  scores = jnp.where(keep, scores, 0.0)
  denom = scores.sum(axis=-1, keepdims=True)
  weights = scores / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  if mask is not None and q_len == kv_len:
    out = jnp.where(mask[:, :, None, None], out, 0.0)
  return out


_jitted_output_and_grads = reference.output_and_grads_fn


def random_qkv(seed, q_len=LENGTH, kv_len=LENGTH):
  return reference.random_qkv(seed, q_len, kv_len, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM)


def make_mask(kind, length=LENGTH, seed=0):
  return reference.make_mask(kind, length, seed=seed)


def output_and_grads(fn, q, k, v, *, mask=None, causal=False):
  """fn's output and the gradients w.r.t. q, k, v of a weighted sum of it."""
  return _jitted_output_and_grads(fn, causal)(q, k, v, mask)


@functools.cache
def _jitted_output(fn, causal):
  return jax.jit(lambda q, k, v, mask: fn(q, k, v, mask=mask, causal=causal))


def output(fn, q, k, v, *, mask=None, causal=False):
  return _jitted_output(fn, causal)(q, k, v, mask)


# 7 does not divide LENGTH (the default in these tests), 8 does, 64 exceeds it.
CHUNK_SIZES = [7, 8, 64]
CHUNKED = {c: functools.partial(linear_lib.linear_attention, chunk_size=c) for c in CHUNK_SIZES}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_values_and_grads_match_reference(mask_kind, causal):
  q, k, v = random_qkv(seed=1)
  mask = make_mask(mask_kind)
  out, grads = output_and_grads(CHUNKED[7], q, k, v, mask=mask, causal=causal)
  ref, ref_grads = output_and_grads(reference_linear_attention, q, k, v, mask=mask, causal=causal)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_chunked_causal_matches_reference_for_any_chunk_size(chunk_size):
  q, k, v = random_qkv(seed=2)
  mask = make_mask("random", seed=2)
  out, grads = output_and_grads(CHUNKED[chunk_size], q, k, v, mask=mask, causal=True)
  ref, ref_grads = output_and_grads(reference_linear_attention, q, k, v, mask=mask, causal=True)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_lengths_match_reference(causal):
  # Keys 0..4 of the first sequence are masked: with causal its first five
  # queries see nothing although they are not padding, so they must be 0.
  q, k, v = random_qkv(seed=3, q_len=13, kv_len=29)
  mask = jnp.asarray(np.arange(29)[None, :] >= np.array([[5], [0]]))
  out = output(CHUNKED[7], q, k, v, mask=mask, causal=causal)
  chex.assert_shape(out, (BATCH, 13, HEADS, HEAD_DIM))
  ref = output(reference_linear_attention, q, k, v, mask=mask, causal=causal)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  if causal:
    np.testing.assert_array_equal(np.asarray(out[0, :5]), 0.0)
    assert np.all(np.abs(np.asarray(out[0, 5:])).sum(axis=(1, 2)) > 0)


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_are_zero_with_finite_grads(causal):
  q, k, v = random_qkv(seed=4)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1] = False  # the whole second sequence is padding
  out, grads = output_and_grads(CHUNKED[7], q, k, v, mask=jnp.asarray(mask), causal=causal)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  assert np.all(np.abs(np.asarray(out[0])).sum(axis=(1, 2)) > 0)
  chex.assert_tree_all_finite(grads)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g[1]), 0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_values_at_padded_positions_do_not_matter(causal):
  # The original LRA linear attention summed over padded keys; here they
  # must not change any real output, and padded query rows are zeros.
  q, k, v = random_qkv(seed=5)
  mask = make_mask("random", seed=5)
  junk = random_qkv(seed=6)
  padded = ~mask[:, :, None, None]
  q2, k2, v2 = (jnp.where(padded, 100.0 * j, x) for x, j in zip((q, k, v), junk, strict=True))
  out = np.asarray(output(CHUNKED[7], q, k, v, mask=mask, causal=causal))
  out2 = np.asarray(output(CHUNKED[7], q2, k2, v2, mask=mask, causal=causal))
  real = np.asarray(mask)
  np.testing.assert_allclose(out2[real], out[real], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out2[~real], 0.0)
  assert not np.allclose(np.asarray(q2), np.asarray(q))  # the change is real


@pytest.mark.parametrize("causal", [False, True])
def test_appending_padding_leaves_real_tokens_unchanged(causal):
  real = LENGTH - 9
  q, k, v = random_qkv(seed=7, q_len=real, kv_len=real)
  short = output(CHUNKED[7], q, k, v, mask=jnp.ones((BATCH, real), bool), causal=causal)
  extra = random_qkv(seed=8, q_len=9, kv_len=9)
  q2, k2, v2 = (jnp.concatenate([a, b], axis=1) for a, b in zip((q, k, v), extra, strict=True))
  mask = jnp.asarray(np.arange(LENGTH)[None, :].repeat(BATCH, 0) < real)
  long = output(CHUNKED[7], q2, k2, v2, mask=mask, causal=causal)
  chex.assert_trees_all_close(long[:, :real], short, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(long[:, real:]), 0.0)


def test_causal_outputs_ignore_future_tokens():
  q, k, v = random_qkv(seed=9)
  cut = 17  # inside the third chunk of 7
  junk = random_qkv(seed=10)
  future = (np.arange(LENGTH) >= cut)[None, :, None, None]
  q2, k2, v2 = (jnp.where(future, j, x) for x, j in zip((q, k, v), junk, strict=True))
  out = np.asarray(output(CHUNKED[7], q, k, v, causal=True))
  out2 = np.asarray(output(CHUNKED[7], q2, k2, v2, causal=True))
  np.testing.assert_allclose(out2[:, :cut], out[:, :cut], atol=1e-6, rtol=1e-6)
  assert not np.allclose(out2[:, cut:], out[:, cut:], atol=1e-3)


@nnx.jit
def module_output_and_grads(module, x, mask):
  def loss(module):
    return jnp.sum(module(x, mask=mask) ** 2)

  return module(x, mask=mask), nnx.grad(loss)(module)


def _build(causal, **kwargs):
  return attention.make(
    "linear",
    in_features=16,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


def test_module_from_make():
  x = jnp.asarray(np.random.default_rng(11).standard_normal((BATCH, 23, 16)), jnp.float32)
  mask = make_mask("right_padding", length=23)
  module = _build(causal=True, chunk_size=5)
  assert type(module) is linear_lib.LinearAttention
  assert module.chunk_size == 5
  y, grads = module_output_and_grads(module, x, mask)
  chex.assert_shape(y, x.shape)
  chex.assert_tree_all_finite((y, grads))
  assert float(jnp.abs(grads["query"]["kernel"][...]).sum()) > 0


@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_invalid_chunk_size_raises(value):
  with pytest.raises(ConfigError, match="'linear'.*chunk_size"):
    attention.make(
      "linear",
      in_features=16,
      num_heads=HEADS,
      head_dim=HEAD_DIM,
      rngs=nnx.Rngs(0),
      chunk_size=value,
    )
  q, k, v = random_qkv(seed=12)
  with pytest.raises(ConfigError, match="'linear'.*chunk_size"):
    linear_lib.linear_attention(q, k, v, causal=True, chunk_size=value)


def test_make_unknown_kwarg_names_the_variant():
  with pytest.raises(ConfigError, match="'linear'.*num_features"):
    _build(causal=False, num_features=4)
  assert "linear" in attention.available()


_train_temp_bytes = reference.train_temp_bytes


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_memory_is_subquadratic(causal):
  soft_2x = _train_temp_bytes(attention.softmax_attention, 4096, False)
  lin, lin_2x = (_train_temp_bytes(linear_lib.linear_attention, n, causal) for n in (2048, 4096))
  assert lin_2x < 2.6 * lin
  assert lin_2x < 0.25 * soft_2x
