"""Local attention over contiguous blocks against dense masked softmax under its pattern.

The reference builds the [L, L] pattern with `local_pattern` (allowed in a
test, never in the kernel) and applies exact softmax to it, written from the
definition. Lengths are chosen so the block size does not divide them
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
from efficient_transformers.attention.local import local_attention, local_pattern
from efficient_transformers.attention.softmax import softmax_attention
from efficient_transformers.errors import ConfigError
from tests import attention_reference as reference

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 37, 2, 8
BLOCK = 8  # 37 = 4 * 8 + 5: a ragged last block
CONFIGS = {
  "one_neighbor": dict(block_size=BLOCK, num_neighbors=1),
  "two_neighbors_b5": dict(block_size=5, num_neighbors=2),
  "all_neighbors": dict(block_size=BLOCK, num_neighbors=100),  # clipped to 4: every block
}


def pattern_reference(q, k, v, pattern, *, mask=None):
  return reference.dense_attention(q, k, v, mask=mask, pattern=pattern)


def random_qkv(seed, q_len=LENGTH, kv_len=LENGTH):
  return reference.random_qkv(seed, q_len, kv_len, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM)


def make_mask(kind, length=LENGTH, seed=0):
  return reference.make_mask(kind, length, seed=seed)


_runner = reference.output_and_grads_fn


@functools.cache
def local_fn(name):
  return functools.partial(local_attention, **CONFIGS[name])


@functools.cache
def reference_fn(name, q_len, kv_len, causal):
  pattern = local_pattern(q_len, kv_len, causal=causal, **CONFIGS[name])
  return lambda q, k, v, *, mask, causal: pattern_reference(q, k, v, pattern, mask=mask)


@pytest.mark.parametrize("mask_kind", ["right_padding", "random"])
@pytest.mark.parametrize(
  "name, causal", [("one_neighbor", False), ("one_neighbor", True), ("two_neighbors_b5", True)]
)
def test_values_and_grads_match_dense_pattern(name, causal, mask_kind):
  q, k, v = random_qkv(seed=1)
  mask = make_mask(mask_kind)
  out, grads = _runner(local_fn(name), causal)(q, k, v, mask)
  ref, ref_grads = _runner(reference_fn(name, LENGTH, LENGTH, causal), causal)(q, k, v, mask)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


def test_cross_attention_lengths_match_dense_pattern():
  q, k, v = random_qkv(seed=2, q_len=13, kv_len=29)
  mask = jnp.asarray(np.arange(29)[None, :] >= np.array([[5], [0]]))
  fn = functools.partial(local_fn("one_neighbor"), causal=True)
  out = jax.jit(fn)(q, k, v, mask=mask)
  chex.assert_shape(out, (BATCH, 13, HEADS, HEAD_DIM))
  ref = reference_fn("one_neighbor", 13, 29, True)(q, k, v, mask=mask, causal=True)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[0, :5]), 0.0)  # causal rows with no key


@pytest.mark.parametrize(
  "name, causal",
  [
    ("all_neighbors", False),  # 5 blocks, neighbors clipped: every block is seen
    ("one_block", True),  # block_size == length: one block, the whole sequence
  ],
)
def test_window_covering_everything_is_exact_softmax(name, causal):
  fn = local_fn(name) if name != "one_block" else _one_block
  q, k, v = random_qkv(seed=3)
  mask = make_mask("random", seed=3)
  out, grads = _runner(fn, causal)(q, k, v, mask)
  ref, ref_grads = _runner(softmax_attention, causal)(q, k, v, mask)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


_one_block = functools.partial(local_attention, block_size=LENGTH, num_neighbors=1)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance_and_zero_padded_rows(causal):
  q, k, v = random_qkv(seed=4)
  mask = make_mask("random", seed=4)
  run = _runner(local_fn("one_neighbor"), causal)
  out = np.asarray(run(q, k, v, mask)[0])
  junk = random_qkv(seed=5)
  pad = ~np.asarray(mask)[:, :, None, None]
  q2, k2, v2 = (jnp.where(pad, j, x) for x, j in zip((q, k, v), junk, strict=True))
  out2 = np.asarray(run(q2, k2, v2, mask)[0])
  real = ~pad[:, :, 0, 0]
  np.testing.assert_allclose(out2[real], out[real], atol=1e-6)
  np.testing.assert_array_equal(out[~real], 0.0)
  np.testing.assert_array_equal(out2[~real], 0.0)


def test_fully_masked_sequence_is_zero_not_nan():
  q, k, v = random_qkv(seed=6)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1] = False
  out, grads = _runner(local_fn("one_neighbor"), True)(q, k, v, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  chex.assert_tree_all_finite(grads)


def test_causal_future_tokens_do_not_change_the_past():
  q, k, v = random_qkv(seed=7)
  run = _runner(local_fn("two_neighbors_b5"), True)
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


def test_pattern_is_contiguous_blocks():
  p = local_pattern(8, 8, block_size=2, num_neighbors=1, causal=False)
  # Query 0 (block 0) sees blocks 0-1 = keys 0-3; query 2 (block 1) keys 0-5;
  # query 7 (block 3) keys 4-7. Contiguous: 0 sees 1, not 4 (LRA's strided grouping).
  np.testing.assert_array_equal(p[0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(p[2], [1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(p[7], [0, 0, 0, 0, 1, 1, 1, 1])
  c = local_pattern(8, 8, block_size=2, num_neighbors=1, causal=True)
  np.testing.assert_array_equal(c[2], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(c[5], [0, 0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(c, p & np.tril(np.ones((8, 8), bool)))
  module = _build(causal=True, block_size=2, num_neighbors=1)
  np.testing.assert_array_equal(module.pattern(8), c)


_train_temp_bytes = reference.train_temp_bytes


def test_compiled_memory_is_subquadratic():
  local = functools.partial(local_attention, block_size=64, num_neighbors=1)
  soft, soft_2x = (_train_temp_bytes(softmax_attention, n) for n in (2048, 4096))
  mem, mem_2x = (_train_temp_bytes(local, n) for n in (2048, 4096))
  print(f"temp bytes: softmax {soft} -> {soft_2x}; local {mem} -> {mem_2x}")
  assert soft_2x > 3 * soft
  assert mem_2x < 2.6 * mem
  assert mem_2x < soft_2x


def _build(causal=False, **kwargs):
  return registry.make(
    "local",
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
  module = _build(causal=True, block_size=4, num_neighbors=6)
  assert "local" in registry.available()
  assert type(module) is registry.get_class("local")
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
  [("block_size", 0), ("block_size", -3), ("block_size", 2.5), ("num_neighbors", -1)],
)
def test_invalid_sizes_raise_config_error(param, value):
  with pytest.raises(ConfigError, match=f"'local'.*{param}"):
    _build(**{param: value})
  q, k, v = random_qkv(seed=10)
  with pytest.raises(ConfigError, match=f"'local'.*{param}"):
    local_attention(q, k, v, **{param: value})


def test_block_larger_than_sequence_raises_config_error():
  q, k, v = random_qkv(seed=11)
  with pytest.raises(ConfigError, match="'local'.*block_size=64.*sequence length 37"):
    local_attention(q, k, v, block_size=64)
  module = _build(block_size=64)
  with pytest.raises(ConfigError, match="'local'.*block_size"):
    module(jnp.zeros((BATCH, LENGTH, 16)))


def test_make_unknown_kwarg_names_the_variant():
  with pytest.raises(ConfigError, match="'local'.*window"):
    _build(window=4)
