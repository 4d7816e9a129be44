"""Longformer attention (sliding window + global tokens) against dense softmax references.

The oracle is tests.attention_reference.dense_attention, restricted to the
dense pattern (built here by hand or by `longformer_pattern`; allowed in a
test, never in the kernel). Lengths are chosen so the window does not divide
them (internal padding is exercised).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.attention import longformer as longformer_lib
from efficient_transformers.attention import registry
from efficient_transformers.attention.base import QKV_BIAS_AXES, QKV_KERNEL_AXES
from efficient_transformers.attention.softmax import softmax_attention
from efficient_transformers.errors import ConfigError
from tests.attention_reference import (
  BATCH,
  HEAD_DIM,
  HEADS,
  dense_attention,
  make_mask,
  output_and_grads_fn,
  random_qkv,
  replace_future,
  replace_padded,
  train_temp_bytes,
)

LENGTH = 37  # 37 = 9 * 4 + 1: a ragged last block for window 4
CONFIGS = {
  "w4_cls": dict(window=4, global_positions=(0,)),
  "w5_three": dict(window=5, global_positions=(0, 9, 36)),  # includes the last position
  "w37_none": dict(window=LENGTH, global_positions=()),  # window covers everything
  "w3_all": dict(window=3, global_positions=tuple(range(LENGTH))),  # every position global
}


@functools.cache
def longformer_fn(name):
  return functools.partial(longformer_lib.longformer_attention, **CONFIGS[name])


@functools.cache
def pattern_fn(name, causal):
  """dense_attention under `longformer_pattern` for config `name` (q, k, v reused)."""
  pattern = longformer_lib.longformer_pattern(LENGTH, causal=causal, **CONFIGS[name])
  return lambda q, k, v, *, mask, causal: dense_attention(
    q, k, v, mask=mask, causal=causal, pattern=pattern
  )


def _window_and_global_columns(length, window, positions, causal):
  """Hand-built pattern of the non-global rows: |i - j| <= window or j global (and j <= i)."""
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  allowed = (np.abs(i - j) <= window) | np.isin(j, positions)
  return allowed & (j <= i) if causal else allowed


def _check_close(got, want):
  (out, grads), (ref, ref_grads) = got, want
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


# Two configurations, each compiled once (mask=None is covered by the separate-projection test).
PATTERN_CASES = [("w4_cls", False), ("w5_three", True)]


@pytest.mark.parametrize("mask_kind", ["right_padding", "random"])
@pytest.mark.parametrize("name, causal", PATTERN_CASES)
def test_values_and_grads_match_dense_pattern(name, causal, mask_kind):
  q, k, v = random_qkv(1, LENGTH)
  mask = make_mask(mask_kind, LENGTH, seed=1)  # 'random' pads position 0, a global token
  got = output_and_grads_fn(longformer_fn(name), causal)(q, k, v, mask)
  want = output_and_grads_fn(pattern_fn(name, causal), causal)(q, k, v, mask)
  _check_close(got, want)


@pytest.mark.parametrize("name, causal", [("w37_none", True), ("w3_all", False)])
def test_exactness_limits_equal_dense_softmax(name, causal):
  # A window as long as the sequence (no globals), or every position global,
  # is exact softmax attention.
  q, k, v = random_qkv(2, LENGTH)
  mask = make_mask("random", LENGTH, seed=2)
  got = output_and_grads_fn(longformer_fn(name), causal)(q, k, v, mask)
  want = output_and_grads_fn(dense_attention, causal)(q, k, v, mask)
  _check_close(got, want)


@pytest.mark.parametrize("causal", [False, True])
def test_separate_global_projections(causal):
  # Global rows: dense attention of q_g over k_g, v_g. Other rows: ordinary
  # q, k, v over the window and the global columns.
  window, positions = 4, (0, 7, 20)
  q, k, v = random_qkv(3, LENGTH)
  qkv_g = random_qkv(4, LENGTH)
  mask = make_mask("right_padding", LENGTH) if causal else None
  fn = jax.jit(
    functools.partial(
      longformer_lib.longformer_attention,
      causal=causal,
      window=window,
      global_positions=positions,
    )
  )
  rows_only = np.asarray(positions)
  out = np.asarray(fn(q, k, v, mask=mask, global_qkv=(qkv_g[0][:, rows_only], *qkv_g[1:])))
  rows = np.asarray(dense_attention(*qkv_g, mask=mask, causal=causal))
  pattern = _window_and_global_columns(LENGTH, window, positions, causal)
  others = np.asarray(dense_attention(q, k, v, mask=mask, causal=causal, pattern=pattern))
  is_global = np.isin(np.arange(LENGTH), positions)
  np.testing.assert_allclose(out[:, is_global], rows[:, is_global], atol=1e-5)
  np.testing.assert_allclose(out[:, ~is_global], others[:, ~is_global], atol=1e-5)
  # And the global projections matter: reusing q, k, v gives other global rows.
  reused = np.asarray(fn(q, k, v, mask=mask, global_qkv=(q[:, rows_only], k, v)))  # same compiled
  np.testing.assert_allclose(reused[:, ~is_global], out[:, ~is_global], atol=1e-6)
  assert not np.allclose(reused[:, is_global], out[:, is_global], atol=1e-3)


@pytest.mark.parametrize("mask_kind", ["right_padding", "random"])
@pytest.mark.parametrize("name, causal", PATTERN_CASES)
def test_padding_invariance_and_zero_padded_rows(name, causal, mask_kind):
  q, k, v = random_qkv(5, LENGTH)
  mask = make_mask(mask_kind, LENGTH, seed=5)
  run = output_and_grads_fn(longformer_fn(name), causal)
  out = np.asarray(run(q, k, v, mask)[0])
  out2 = np.asarray(run(*replace_padded((q, k, v), mask, seed=6), mask)[0])
  real = np.asarray(mask)
  np.testing.assert_allclose(out2[real], out[real], atol=1e-6)
  np.testing.assert_array_equal(out[~real], 0.0)
  np.testing.assert_array_equal(out2[~real], 0.0)


def test_fully_masked_sequence_is_zero_not_nan():
  q, k, v = random_qkv(7, LENGTH)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1] = False
  out, grads = output_and_grads_fn(longformer_fn("w5_three"), True)(q, k, v, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  chex.assert_tree_all_finite(grads)


def test_causal_future_tokens_do_not_change_the_past():
  q, k, v = random_qkv(8, LENGTH)
  run = output_and_grads_fn(longformer_fn("w5_three"), True)
  mask = jnp.ones((BATCH, LENGTH), bool)
  t = 17  # after the global token 9, before the global token 36
  out = np.asarray(run(q, k, v, mask)[0])
  out2 = np.asarray(run(*replace_future((q, k, v), t, seed=9), mask)[0])
  np.testing.assert_allclose(out2[:, : t + 1], out[:, : t + 1], atol=1e-6)
  assert not np.allclose(out2[:, t + 1 :], out[:, t + 1 :], atol=1e-3)


def test_pattern_on_a_hand_checked_case():
  p = longformer_lib.longformer_pattern(8, window=1, global_positions=(0, 5), causal=False)
  np.testing.assert_array_equal(p[0], [1] * 8)  # global row
  np.testing.assert_array_equal(p[5], [1] * 8)  # global row
  np.testing.assert_array_equal(p[2], [1, 1, 1, 1, 0, 1, 0, 0])  # window 1-3, globals 0, 5
  np.testing.assert_array_equal(p[7], [1, 0, 0, 0, 0, 1, 1, 1])
  c = longformer_lib.longformer_pattern(8, window=1, global_positions=(0, 5), causal=True)
  np.testing.assert_array_equal(c[2], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(c[5], [1, 1, 1, 1, 1, 1, 0, 0])  # global row, causal
  np.testing.assert_array_equal(c[7], [1, 0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(c, p & np.tril(np.ones((8, 8), bool)))
  module = _build(causal=True, window=1, global_positions=(5, 0, 5))  # order, duplicates
  np.testing.assert_array_equal(module.pattern(8), c)


def test_compiled_memory_is_subquadratic():
  fn = functools.partial(longformer_lib.longformer_attention, window=64, global_positions=(0,))
  mem, mem_2x = (train_temp_bytes(fn, n) for n in (2048, 4096))
  soft_2x = train_temp_bytes(softmax_attention, 4096)
  print(f"temp bytes: longformer {mem} -> {mem_2x}; softmax(4096) {soft_2x}")
  assert mem_2x < 2.6 * mem
  assert mem_2x < 0.25 * soft_2x


def _build(causal=False, **kwargs):
  return registry.make(
    "longformer",
    in_features=16,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


@functools.partial(nnx.jit, static_argnums=(3, 4))
def _module_outputs(module, x, mask, window, positions):
  """The module's output and param grads, and the same output from the dense references."""
  grads = nnx.grad(lambda m: (m(x, mask=mask) * jnp.cos(x)).sum())(module)
  q, k, v = module.query(x), module.key(x), module.value(x)
  qkv_g = module.query_global(x), module.key_global(x), module.value_global(x)
  pattern = _window_and_global_columns(x.shape[1], window, positions, True)
  ref = dense_attention(q, k, v, mask=mask, causal=True, pattern=pattern)
  rows = dense_attention(*qkv_g, mask=mask, causal=True)
  ref = ref.at[:, np.asarray(positions)].set(rows[:, np.asarray(positions)])
  return module(x, mask=mask), module.out(ref), grads


def test_module_shape_grads_and_projection_wiring():
  length, window, positions = 23, 4, [0, 10]  # a list, as a config would give it
  x = jnp.asarray(np.random.default_rng(10).standard_normal((BATCH, length, 16)), jnp.float32)
  mask = make_mask("right_padding", length)
  module = _build(causal=True, window=window, global_positions=positions)
  assert type(module) is registry.get_class("longformer")
  y, ref, grads = _module_outputs(module, x, mask, window, tuple(positions))
  chex.assert_shape(y, x.shape)
  # Global rows from q_g, k_g, v_g; other rows from q, k, v (dense references).
  chex.assert_trees_all_close(y, ref, atol=1e-5, rtol=1e-5)
  grads = nnx.state(grads, nnx.Param).to_pure_dict()
  chex.assert_tree_all_finite(grads)
  for name in ("query", "key", "value", "out", "query_global", "key_global", "value_global"):
    assert np.abs(np.asarray(grads[name]["kernel"])).max() > 0, name
    axes = QKV_KERNEL_AXES if name != "out" else ("heads", "kv", "embed")
    assert getattr(module, name).kernel.get_metadata()["out_sharding"] == axes
  assert module.query_global.bias.get_metadata()["out_sharding"] == QKV_BIAS_AXES
  with pytest.raises(NotImplementedError, match="__call__"):
    module.attend(x, x, x, mask=mask, deterministic=True)


@nnx.jit
def _dropout_outputs(module, plain, x):
  return module(x, deterministic=True), module(x, deterministic=False), plain(x)


def test_module_dropout_acts_on_head_outputs():
  x = jnp.asarray(np.random.default_rng(11).standard_normal((BATCH, 12, 16)), jnp.float32)
  module = registry.make(
    "longformer", in_features=16, num_heads=HEADS, head_dim=HEAD_DIM, dropout_rate=0.5,
    rngs=nnx.Rngs(0, dropout=1), window=4,
  )  # fmt: skip
  deterministic, dropped, plain = _dropout_outputs(module, _build(window=4), x)
  np.testing.assert_allclose(deterministic, plain, atol=1e-6)
  assert not np.allclose(dropped, plain, atol=1e-3)


@pytest.mark.parametrize(
  "param, value",
  [
    ("window", 0),
    ("window", -3),
    ("window", 2.5),
    ("window", True),
    ("global_positions", (-1,)),
    ("global_positions", (1.5,)),
    ("global_positions", "0"),
  ],
)
def test_invalid_params_raise_config_error(param, value):
  with pytest.raises(ConfigError, match=f"'longformer'.*{param}"):
    _build(**{param: value})
  q, k, v = random_qkv(12, 16)
  with pytest.raises(ConfigError, match=f"'longformer'.*{param}"):
    longformer_lib.longformer_attention(q, k, v, **{param: value})


def test_sizes_beyond_the_sequence_raise_config_error():
  q, k, v = random_qkv(13, 16)
  with pytest.raises(ConfigError, match="'longformer'.*window=64.*sequence length 16"):
    longformer_lib.longformer_attention(q, k, v)
  with pytest.raises(ConfigError, match="'longformer'.*global_positions"):
    longformer_lib.longformer_attention(q, k, v, window=4, global_positions=(0, 16))
  with pytest.raises(ConfigError, match="'longformer'.*window"):
    _build()(jnp.zeros((BATCH, 16, 16)))


def test_make_unknown_kwarg_names_the_variant():
  with pytest.raises(ConfigError, match="'longformer'.*block_size"):
    _build(block_size=4)
