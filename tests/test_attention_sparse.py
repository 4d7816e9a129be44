"""Sparse Transformer attention (fixed, strided) against dense masked softmax under its pattern.

The reference builds the [L, L] pattern with `sparse_pattern` (allowed in a
test, never in the kernel) and applies exact softmax to it, written from the
definition. Lengths are chosen so the block and stride do not divide them
(internal padding is exercised).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.attention import registry
from efficient_transformers.attention.softmax import softmax_attention
from efficient_transformers.attention.sparse import sparse_attention, sparse_pattern
from efficient_transformers.errors import ConfigError
from tests import attention_reference as reference

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 37, 2, 8
BLOCK = 8  # 37 = 4 * 8 + 5: a ragged last block
CONFIGS = {
  "fixed": dict(pattern="fixed", block_size=BLOCK, num_summary=2),
  "strided": dict(pattern="strided", block_size=50, stride=6),  # 37 = 6 * 6 + 1
  "fixed_all_summaries": dict(pattern="fixed", block_size=BLOCK, num_summary=BLOCK),
  "strided_whole": dict(pattern="strided", block_size=LENGTH),  # window == sequence
}


def pattern_reference(q, k, v, pattern, *, mask=None):
  return reference.dense_attention(q, k, v, mask=mask, pattern=pattern)


def random_qkv(seed, q_len=LENGTH, kv_len=LENGTH):
  return reference.random_qkv(seed, q_len, kv_len, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM)


def make_mask(kind, length=LENGTH, seed=0):
  return reference.make_mask(kind, length, seed=seed)


_runner = reference.output_and_grads_fn


@functools.cache
def sparse_fn(name):
  return functools.partial(sparse_attention, **CONFIGS[name])


@functools.cache
def reference_fn(name, q_len, kv_len, causal):
  pattern = sparse_pattern(q_len, kv_len, causal=causal, **CONFIGS[name])
  return lambda q, k, v, *, mask, causal: pattern_reference(q, k, v, pattern, mask=mask)


@pytest.mark.parametrize("mask_kind", ["right_padding", "random"])
@pytest.mark.parametrize(
  "name, causal", [("fixed", False), ("fixed", True), ("strided", False), ("strided", True)]
)
def test_values_and_grads_match_dense_pattern(name, causal, mask_kind):
  q, k, v = random_qkv(seed=1)
  mask = make_mask(mask_kind)
  out, grads = _runner(sparse_fn(name), causal)(q, k, v, mask)
  ref, ref_grads = _runner(reference_fn(name, LENGTH, LENGTH, causal), causal)(q, k, v, mask)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_fixed_pattern_over_several_query_chunks(causal):
  # 90 tokens in blocks of 2: 45 query blocks, more than one chunk of the
  # kernel's loop (20 blocks), the last chunk padded with masked blocks.
  from efficient_transformers.attention import sparse as sparse_lib

  length, kwargs = 90, dict(pattern="fixed", block_size=2, num_summary=1)
  assert -(-length // 2) > 2 * sparse_lib._FIXED_CHUNK_BLOCKS  # three chunks, last one padded
  q, k, v = random_qkv(seed=4, q_len=length, kv_len=length)
  mask = make_mask("random", length, seed=3)
  pattern = sparse_pattern(length, length, causal=causal, **kwargs)
  out, grads = _runner(functools.partial(sparse_attention, **kwargs), causal)(q, k, v, mask)
  ref, ref_grads = _runner(
    lambda q, k, v, *, mask, causal: pattern_reference(q, k, v, pattern, mask=mask), causal
  )(q, k, v, mask)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


def test_cross_attention_lengths_match_dense_pattern():
  q, k, v = random_qkv(seed=2, q_len=13, kv_len=29)
  mask = jnp.asarray(np.arange(29)[None, :] >= np.array([[5], [0]]))
  for name in ("fixed", "strided"):
    fn = functools.partial(sparse_fn(name), causal=True)
    out = jax.jit(fn)(q, k, v, mask=mask)
    chex.assert_shape(out, (BATCH, 13, HEADS, HEAD_DIM))
    ref = reference_fn(name, 13, 29, True)(q, k, v, mask=mask, causal=True)
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[0, :5]), 0.0)  # causal rows with no key


@pytest.mark.parametrize(
  "name, causal",
  [
    ("fixed_all_summaries", True),  # every position is a summary: all blocks seen
    ("strided_whole", False),  # the local window spans the whole sequence
  ],
)
def test_window_covering_everything_is_exact_softmax(name, causal):
  fn = sparse_fn(name)
  q, k, v = random_qkv(seed=3)
  mask = make_mask("random", seed=3)
  out, grads = _runner(fn, causal)(q, k, v, mask)
  ref, ref_grads = _runner(softmax_attention, causal)(q, k, v, mask)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["fixed", "strided"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance_and_zero_padded_rows(name, causal):
  q, k, v = random_qkv(seed=4)
  mask = make_mask("random", seed=4)
  run = _runner(sparse_fn(name), causal)
  out = np.asarray(run(q, k, v, mask)[0])
  junk = random_qkv(seed=5)
  pad = ~np.asarray(mask)[:, :, None, None]
  q2, k2, v2 = (jnp.where(pad, j, x) for x, j in zip((q, k, v), junk, strict=True))
  out2 = np.asarray(run(q2, k2, v2, mask)[0])
  real = ~pad[:, :, 0, 0]
  np.testing.assert_allclose(out2[real], out[real], atol=1e-6)
  np.testing.assert_array_equal(out[~real], 0.0)
  np.testing.assert_array_equal(out2[~real], 0.0)


@pytest.mark.parametrize("name", ["fixed", "strided"])
def test_fully_masked_sequence_is_zero_not_nan(name):
  q, k, v = random_qkv(seed=6)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1] = False
  out, grads = _runner(sparse_fn(name), True)(q, k, v, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("name", ["fixed", "strided"])
def test_causal_future_tokens_do_not_change_the_past(name):
  q, k, v = random_qkv(seed=7)
  run = _runner(sparse_fn(name), True)
  mask = jnp.ones((BATCH, LENGTH), bool)
  out = np.asarray(run(q, k, v, mask)[0])
  t = 17
  junk = random_qkv(seed=8)
  q2, k2, v2 = (
    jnp.concatenate([x[:, :t], j[:, t:]], axis=1) for x, j in zip((q, k, v), junk, strict=True)
  )
  out2 = np.asarray(run(q2, k2, v2, mask)[0])
  np.testing.assert_allclose(out2[:, :t], out[:, :t], atol=1e-6)
  assert not np.allclose(out2[:, t:], out[:, t:], atol=1e-3)


def test_fixed_pattern_matches_the_paper():
  # Block l = 2, c = 1 summary: the summaries are positions 1, 3, 5, 7.
  p = sparse_pattern(8, 8, pattern="fixed", block_size=2, num_summary=1)
  np.testing.assert_array_equal(p[0], [1, 1, 0, 1, 0, 1, 0, 1])  # own block + all summaries
  np.testing.assert_array_equal(p[5], [0, 1, 0, 1, 1, 1, 0, 1])
  c = sparse_pattern(8, 8, pattern="fixed", block_size=2, num_summary=1, causal=True)
  np.testing.assert_array_equal(c[4], [0, 1, 0, 1, 1, 0, 0, 0])  # previous summaries + self
  np.testing.assert_array_equal(c[5], [0, 1, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(c[1], [1, 1, 0, 0, 0, 0, 0, 0])
  module = _build(causal=True, pattern="fixed", block_size=2, num_summary=1)
  np.testing.assert_array_equal(module.pattern(8), c)


def test_strided_pattern_matches_the_paper():
  # Stride l = 3: the window |i - j| < 3 plus every third position (i - j) mod 3 == 0.
  c = sparse_pattern(8, 8, pattern="strided", stride=3, causal=True)
  np.testing.assert_array_equal(c[7], [0, 1, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(c[2], [1, 1, 1, 0, 0, 0, 0, 0])
  p = sparse_pattern(8, 8, pattern="strided", stride=3)
  np.testing.assert_array_equal(p[0], [1, 1, 1, 1, 0, 0, 1, 0])
  np.testing.assert_array_equal(p[4], [0, 1, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(c, p & np.tril(np.ones((8, 8), bool)))
  module = _build(pattern="strided", block_size=3)
  np.testing.assert_array_equal(module.pattern(8), p)


_train_temp_bytes = reference.train_temp_bytes


def test_compiled_memory_is_subquadratic():
  fixed = functools.partial(sparse_attention, pattern="fixed", block_size=128, num_summary=1)
  strided = functools.partial(sparse_attention, pattern="strided", stride=64)
  soft, soft_2x = (_train_temp_bytes(softmax_attention, n) for n in (2048, 4096))
  assert soft_2x > 3 * soft
  for name, fn in (("fixed", fixed), ("strided", strided)):
    mem, mem_2x = (_train_temp_bytes(fn, n) for n in (2048, 4096))
    print(f"temp bytes: softmax {soft} -> {soft_2x}; {name} {mem} -> {mem_2x}")
    assert mem_2x < 2.6 * mem
    assert mem_2x < soft_2x


def _build(causal=False, **kwargs):
  return registry.make(
    "sparse",
    in_features=16,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


@nnx.jit
def _module_outputs(module, exact, x, mask):
  grads = nnx.grad(lambda m: m(x, mask=mask).sum())(module)
  return module(x, mask=mask), exact(x, mask=mask), grads


def test_module_shape_grads_and_exactness_limit():
  x = jnp.asarray(np.random.default_rng(9).standard_normal((BATCH, 23, 16)), jnp.float32)
  mask = make_mask("right_padding", length=23)
  module = _build(causal=True, block_size=4, num_summary=4)  # covers everything
  assert "sparse" in registry.available()
  assert type(module) is registry.get_class("sparse")
  exact = registry.make(
    "softmax", in_features=16, num_heads=HEADS, head_dim=HEAD_DIM, causal=True, rngs=nnx.Rngs(1)
  )
  nnx.update(exact, nnx.state(module))
  y, y_exact, grads = _module_outputs(module, exact, x, mask)
  chex.assert_shape(y, x.shape)
  chex.assert_trees_all_close(y, y_exact, atol=1e-5, rtol=1e-5)
  chex.assert_tree_all_finite(nnx.state(grads))


@pytest.mark.parametrize(
  "param, value",
  [
    ("block_size", 0),
    ("block_size", -3),
    ("block_size", 2.5),
    ("num_summary", 0),
    ("num_summary", 9),  # more summaries than the block of 8 holds
    ("stride", 0),
    ("pattern", "axial"),
  ],
)
def test_invalid_config_raises_config_error(param, value):
  kwargs = {"block_size": BLOCK, param: value}
  with pytest.raises(ConfigError, match=f"'sparse'.*{param}"):
    _build(**kwargs)
  q, k, v = random_qkv(seed=10)
  with pytest.raises(ConfigError, match=f"'sparse'.*{param}"):
    sparse_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
  "kwargs, param",
  [
    (dict(pattern="fixed"), "block_size=50"),
    (dict(pattern="strided", stride=40), "stride=40"),
    (dict(pattern="strided"), "block_size=50"),
  ],
)
def test_block_larger_than_sequence_raises_config_error(kwargs, param):
  q, k, v = random_qkv(seed=11)
  with pytest.raises(ConfigError, match=f"'sparse'.*{param}.*sequence length 37"):
    sparse_attention(q, k, v, **kwargs)
  module = _build(**kwargs)
  with pytest.raises(ConfigError, match=f"'sparse'.*{param}"):
    module(jnp.zeros((BATCH, LENGTH, 16)))


def test_make_unknown_kwarg_names_the_variant():
  with pytest.raises(ConfigError, match="'sparse'.*num_neighbors"):
    _build(num_neighbors=4)
