"""BigBird (ITC) attention against dense masked softmax under its pattern, and its random layout.

The oracle is tests.attention_reference.dense_attention restricted to
`bigbird_pattern` (an O(L^2) boolean set, so it counts every (query, key) pair
once) of each row's real length (the index of its last real key + 1: the
layout follows it); the kernel must match it in values and q/k/v gradients.
Lengths are not multiples of the block size, so internal padding is exercised.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import bigbird as bigbird_lib
from efficient_transformers.attention.softmax import softmax_attention
from efficient_transformers.errors import ConfigError
from tests import attention_reference as reference

BATCH, HEADS, HEAD_DIM = reference.BATCH, reference.HEADS, reference.HEAD_DIM
LENGTH = 37  # 9 blocks of 4 and one ragged token
SEED = 3
CONFIGS = {
  # 10 blocks: window 3, first + last global, one random block per (head, query block).
  "defaults_small": dict(block_size=4, num_random_blocks=1),
  # 5 blocks of 8, the first global: window + global + random blocks (3 asked, at most 2
  # candidates: clipped) cover every pair, so this is exact softmax attention.
  "covering": dict(block_size=8, num_global_blocks=1, num_random_blocks=3),
  # 10 blocks of 3 (cross-attention, 29 keys): window 5, no global blocks, two random.
  "wide_no_global": dict(
    block_size=3, num_window_blocks=5, num_global_blocks=0, num_random_blocks=2
  ),
}


@functools.cache
def bigbird_fn(name, layout_key=SEED):
  return functools.partial(bigbird_lib.bigbird_attention, layout_key=layout_key, **CONFIGS[name])


def real_lengths(mask):
  """Per row, the index of the last real key + 1: the length BigBird's layout follows."""
  return tuple(int(np.flatnonzero(row).max(initial=-1)) + 1 for row in np.asarray(mask))


@functools.cache
def pattern(name, q_len=LENGTH, kv_len=LENGTH, layout_key=SEED, real_length=None):
  """[heads, q_len, kv_len]: the pattern of a sequence whose last real key is real_length - 1."""
  return bigbird_lib.bigbird_pattern(
    q_len,
    kv_length=kv_len,
    heads=HEADS,
    layout_key=layout_key,
    real_length=real_length,
    **CONFIGS[name],
  )


@functools.cache
def oracle_fn(name, real):
  """The dense oracle under the pattern of each row's real length (a tuple per row)."""
  rows = np.stack([pattern(name, real_length=n) for n in real])  # [batch, heads, L, L]
  return functools.partial(reference.dense_attention, pattern=rows)


@pytest.mark.parametrize("mask_kind", ["right_padding", "random"])
@pytest.mark.parametrize("name", ["defaults_small", "covering"])
def test_values_and_grads_match_dense_pattern(name, mask_kind):
  q, k, v = reference.random_qkv(1, LENGTH)
  mask = reference.make_mask(mask_kind, LENGTH, seed=1)
  out, grads = reference.output_and_grads_fn(bigbird_fn(name), False)(q, k, v, mask)
  oracle = oracle_fn(name, real_lengths(mask))
  ref, ref_grads = reference.output_and_grads_fn(oracle, False)(q, k, v, mask)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
  if name == "covering":
    assert pattern(name).all()  # the oracle is exact softmax attention here
  else:
    assert 0.3 < pattern(name).mean() < 0.8  # a real sparse pattern


def test_cross_attention_lengths_without_global_blocks_match_dense_pattern():
  q, k, v = reference.random_qkv(2, 13, 29)
  mask = jnp.asarray(np.arange(29)[None, :] >= np.array([[5], [0]]))
  out = jax.jit(bigbird_fn("wide_no_global"))(q, k, v, mask=mask)
  chex.assert_shape(out, (BATCH, 13, HEADS, HEAD_DIM))
  ref = reference.dense_attention(q, k, v, mask=mask, pattern=pattern("wide_no_global", 13, 29))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)


def test_uniform_logits_count_every_key_once():
  # With q = 0 every key in a row's softmax gets the same weight, so a key counted
  # twice (a window block that is also global) would pull the row's average toward it.
  _, k, v = reference.random_qkv(4, LENGTH)
  q = jnp.zeros_like(k)
  mask = reference.make_mask("right_padding", LENGTH)
  out = reference.output_and_grads_fn(bigbird_fn("defaults_small"), False)(q, k, v, mask)[0]
  oracle = oracle_fn("defaults_small", real_lengths(mask))
  ref = reference.output_and_grads_fn(oracle, False)(q, k, v, mask)[0]
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "num_blocks, kwargs",
  [
    (10, dict(num_random_blocks=3)),
    (6, dict(num_window_blocks=5, num_random_blocks=3)),  # too few candidates: clipped
    (9, dict(num_global_blocks=1, num_random_blocks=2)),
    (7, dict(num_window_blocks=1, num_global_blocks=0, num_random_blocks=4)),
  ],
)
def test_key_blocks_have_no_duplicates_and_build_the_pattern(num_blocks, kwargs):
  ids = bigbird_lib.bigbird_key_blocks(num_blocks, heads=3, layout_key=7, **kwargs)
  full = bigbird_lib.bigbird_pattern(num_blocks, heads=3, block_size=1, layout_key=7, **kwargs)
  g = kwargs.get("num_global_blocks", 2)
  half = (kwargs.get("num_window_blocks", 3) - 1) // 2
  global_blocks = {0, num_blocks - 1} if g == 2 else {0} if g == 1 else set()
  for h in range(3):
    for i in range(num_blocks):
      seen = [j for j in ids[h, i] if j >= 0]
      if i in global_blocks:
        assert not seen and full[h, i].all()  # dense row
        continue
      assert len(seen) == len(set(seen)), (h, i, seen)
      np.testing.assert_array_equal(np.flatnonzero(full[h, i]), sorted(seen))
      window = {j for j in range(i - half, i + half + 1) if 0 <= j < num_blocks}
      assert window | global_blocks <= set(seen)
      extra = set(seen) - window - global_blocks
      candidates = num_blocks - len(window | global_blocks)
      assert len(extra) == min(kwargs["num_random_blocks"], candidates)


@pytest.mark.parametrize(
  "kwargs",
  [dict(num_random_blocks=3), dict(num_global_blocks=1, num_random_blocks=2)],
)
def test_key_blocks_follow_the_real_blocks_not_the_padded_count(kwargs):
  # 7 real blocks padded to 7, 10 or 16: real query blocks see the same key blocks
  # (the last real block is the global one), and no padded block is ever a key block.
  alone = bigbird_lib.bigbird_key_blocks(7, heads=3, layout_key=7, **kwargs)
  for num_blocks in (10, 16):
    padded = bigbird_lib.bigbird_key_blocks(
      num_blocks, heads=3, layout_key=7, real_blocks=7, **kwargs
    )
    assert padded.max() < 7
    for h in range(3):
      for i in range(7):
        assert sorted(padded[h, i][padded[h, i] >= 0]) == sorted(alone[h, i][alone[h, i] >= 0])
  # As token patterns: 26 real tokens in blocks of 4, in sequences of 26, 40 and 64.
  full = dict(heads=3, block_size=4, layout_key=7, **kwargs)
  alone = bigbird_lib.bigbird_pattern(26, **full)
  for length in (40, 64):
    padded = bigbird_lib.bigbird_pattern(length, real_length=26, **full)
    np.testing.assert_array_equal(padded[:, :26, :26], alone)
    assert not padded[:, :, 26:].any()  # padding is never a key


def test_pattern_hand_checked_window_and_global_blocks():
  # 6 blocks of 2 tokens, window 3, no random blocks; block-level rows below.
  first_and_last = np.array(
    [
      [1, 1, 1, 1, 1, 1],  # global query block: dense
      [1, 1, 1, 0, 0, 1],  # window 0-2, global 0 and 5
      [1, 1, 1, 1, 0, 1],
      [1, 0, 1, 1, 1, 1],
      [1, 0, 0, 1, 1, 1],
      [1, 1, 1, 1, 1, 1],  # global query block: dense
    ],
    bool,
  )
  first_only = np.array(
    [
      [1, 1, 1, 1, 1, 1],
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],
      [1, 0, 1, 1, 1, 0],
      [1, 0, 0, 1, 1, 1],
      [1, 0, 0, 0, 1, 1],  # the last block is an ordinary block now
    ],
    bool,
  )
  tokens = np.ones((2, 2), bool)
  for g, blocks in [(2, first_and_last), (1, first_only)]:
    p = bigbird_lib.bigbird_pattern(
      12, heads=2, block_size=2, num_global_blocks=g, num_random_blocks=0
    )
    np.testing.assert_array_equal(p, np.broadcast_to(np.kron(blocks, tokens), (2, 12, 12)))
  # One random block: outside the window and the globals, one per (head, query block).
  p = bigbird_lib.bigbird_pattern(16, heads=2, block_size=2, num_random_blocks=1, layout_key=0)
  assert p[:, :2].all() and p[:, -2:].all() and p[:, :, :2].all() and p[:, :, -2:].all()
  base = bigbird_lib.bigbird_pattern(16, heads=2, block_size=2, num_random_blocks=0)
  extra = p & ~base
  assert (extra[:, 2:-2].sum(axis=-1) == 2).all()  # exactly one extra block of 2 keys per row
  assert not extra[:, :2].any() and not extra[:, -2:].any()
  # 9 real tokens padded to 12: the last REAL block (block 4, tokens 8-9) is global.
  p = bigbird_lib.bigbird_pattern(12, heads=2, block_size=2, num_random_blocks=0, real_length=9)
  five_blocks = np.array(
    [
      [1, 1, 1, 1, 1],  # global query block: dense
      [1, 1, 1, 0, 1],  # window 0-2, global 0 and 4
      [1, 1, 1, 1, 1],
      [1, 0, 1, 1, 1],
      [1, 1, 1, 1, 1],  # the last real block: global
    ],
    bool,
  )
  blocks = np.kron(five_blocks, tokens)[:, :9]
  np.testing.assert_array_equal(p[:, :10, :9], np.broadcast_to(blocks, (2, 10, 9)))
  assert not p[:, :, 9:].any()


def test_layout_depends_on_the_key_only():
  kwargs = dict(heads=HEADS, block_size=2, num_random_blocks=2)
  a = bigbird_lib.bigbird_pattern(40, layout_key=0, **kwargs)
  np.testing.assert_array_equal(a, bigbird_lib.bigbird_pattern(40, layout_key=0, **kwargs))
  assert not np.array_equal(a, bigbird_lib.bigbird_pattern(40, layout_key=1, **kwargs))
  assert not np.array_equal(a[0], a[1])  # heads draw their own blocks
  typed = bigbird_lib.bigbird_pattern(40, layout_key=jax.random.key(0), **kwargs)
  np.testing.assert_array_equal(a, typed)
  # A traced seed (as the module passes it) gives the same kernel as the Python int.
  q, k, v = reference.random_qkv(5, LENGTH)
  mask = reference.make_mask("random", LENGTH, seed=5)
  by_int = reference.output_and_grads_fn(bigbird_fn("defaults_small"), False)(q, k, v, mask)[0]
  traced = jax.jit(
    lambda q, k, v, mask, seed: bigbird_lib.bigbird_attention(
      q, k, v, mask=mask, layout_key=seed, **CONFIGS["defaults_small"]
    )
  )
  chex.assert_trees_all_close(traced(q, k, v, mask, jnp.int32(SEED)), by_int, atol=1e-6)
  assert not np.allclose(traced(q, k, v, mask, jnp.int32(SEED + 1)), by_int, atol=1e-3)


@pytest.mark.parametrize("mask_kind", ["right_padding", "random"])
def test_padding_invariance_and_zero_padded_rows(mask_kind):
  qkv = reference.random_qkv(6, LENGTH)
  mask = reference.make_mask(mask_kind, LENGTH, seed=6)
  run = reference.output_and_grads_fn(bigbird_fn("defaults_small"), False)
  out = np.asarray(run(*qkv, mask)[0])
  out2 = np.asarray(run(*reference.replace_padded(qkv, mask, seed=7), mask)[0])
  real = np.asarray(mask)
  np.testing.assert_allclose(out2[real], out[real], atol=1e-6)
  np.testing.assert_array_equal(out[~real], 0.0)
  np.testing.assert_array_equal(out2[~real], 0.0)


def test_fully_masked_sequence_is_zero_not_nan():
  q, k, v = reference.random_qkv(8, LENGTH)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1] = False
  out, grads = reference.output_and_grads_fn(bigbird_fn("defaults_small"), False)(
    q, k, v, jnp.asarray(mask)
  )
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  chex.assert_tree_all_finite((out, grads))


def test_compiled_memory_is_subquadratic():
  fn = bigbird_lib.bigbird_attention  # defaults: block 64, window 3, 2 global, 3 random
  mem, mem_2x = (reference.train_temp_bytes(fn, n) for n in (2048, 4096))
  soft_2x = reference.train_temp_bytes(softmax_attention, 4096)
  print(f"temp bytes: bigbird {mem} -> {mem_2x}; softmax at 4096 {soft_2x}")
  assert mem_2x < 2.6 * mem
  assert mem_2x < 0.25 * soft_2x


def _build(**kwargs):
  return attention.make(
    "bigbird", in_features=16, num_heads=HEADS, head_dim=HEAD_DIM, rngs=nnx.Rngs(0), **kwargs
  )


@nnx.jit
def _module_outputs(module, x, mask):
  def loss(m):
    y = m(x, mask=mask)
    return y.sum(), y

  (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(module)
  return y, grads


def test_module_shape_grads_and_its_pattern():
  length = 23
  x = jnp.asarray(np.random.default_rng(9).standard_normal((BATCH, length, 16)), jnp.float32)
  mask = reference.make_mask("right_padding", length)
  module = _build(block_size=4, num_random_blocks=1)
  assert type(module) is attention.get_class("bigbird")
  y, grads = _module_outputs(module, x, mask)
  chex.assert_shape(y, x.shape)
  chex.assert_tree_all_finite(nnx.state(grads, nnx.Param))
  # The module's kernel (traced seed) computes exactly its `pattern` (stored seed).
  q, k, v = module.query(x), module.key(x), module.value(x)
  patterns = np.stack([module.pattern(length, n) for n in real_lengths(mask)])
  oracle = jax.jit(functools.partial(reference.dense_attention, pattern=patterns))
  chex.assert_trees_all_close(y, module.out(oracle(q, k, v, mask=mask)), atol=1e-5, rtol=1e-5)


def test_layers_get_their_own_reproducible_layouts():
  kwargs = dict(in_features=16, num_heads=HEADS, head_dim=HEAD_DIM, block_size=2)
  rngs = nnx.Rngs(0)
  first, second = (attention.make("bigbird", rngs=rngs, **kwargs) for _ in range(2))
  assert int(first.layout_seed[...]) != int(second.layout_seed[...])
  assert not np.array_equal(first.pattern(40), second.pattern(40))
  again = attention.make("bigbird", rngs=nnx.Rngs(0), **kwargs)
  np.testing.assert_array_equal(again.pattern(40), first.pattern(40))
  other_seed = attention.make("bigbird", rngs=nnx.Rngs(1), **kwargs)
  assert not np.array_equal(other_seed.pattern(40), first.pattern(40))
  # The seed is state, not a trainable parameter.
  assert isinstance(first.layout_seed, bigbird_lib.LayoutSeed)
  assert len(jax.tree.leaves(nnx.state(first, bigbird_lib.LayoutSeed))) == 1
  assert len(jax.tree.leaves(nnx.state(first, nnx.Param))) == 8  # q, k, v, out kernels + biases
  assert first.layout_seed[...].dtype == jnp.int32


def test_causal_is_a_config_error():
  q, k, v = reference.random_qkv(10, LENGTH)
  with pytest.raises(ConfigError, match="'bigbird'.*causal"):
    bigbird_lib.bigbird_attention(q, k, v, causal=True, block_size=4)
  with pytest.raises(ConfigError, match="'bigbird'.*causal"):
    _build(causal=True)


@pytest.mark.parametrize(
  "param, value",
  [
    ("block_size", 0),
    ("block_size", 2.5),
    ("num_window_blocks", 2),
    ("num_window_blocks", 0),
    ("num_global_blocks", 3),
    ("num_global_blocks", -1),
    ("num_random_blocks", -1),
  ],
)
def test_invalid_kwargs_raise_config_error(param, value):
  with pytest.raises(ConfigError, match=f"'bigbird'.*{param}"):
    _build(**{param: value})
  q, k, v = reference.random_qkv(11, LENGTH)
  with pytest.raises(ConfigError, match=f"'bigbird'.*{param}"):
    bigbird_lib.bigbird_attention(q, k, v, **{"block_size": 4, param: value})


def test_block_larger_than_sequence_raises_config_error():
  q, k, v = reference.random_qkv(12, LENGTH)
  with pytest.raises(ConfigError, match="'bigbird'.*block_size=64.*sequence length 37"):
    bigbird_lib.bigbird_attention(q, k, v)
  with pytest.raises(ConfigError, match="'bigbird'.*block_size"):
    _build()(jnp.zeros((BATCH, LENGTH, 16)))


def test_make_unknown_kwarg_names_the_variant():
  assert "bigbird" in attention.available()
  with pytest.raises(ConfigError, match="'bigbird'.*window_size"):
    _build(window_size=3)
