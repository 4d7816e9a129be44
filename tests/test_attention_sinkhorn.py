"""Sparse Sinkhorn attention: Sinkhorn balancing, the hard-permutation limit, padding, causality.

The exactness limit: when the sort matrix is a hard block permutation without
fixed points, the kernel is exact softmax attention restricted to "own block +
block perm(a)" (`sinkhorn_pattern`); the dense oracle is
tests.attention_reference.dense_attention. Length 14 with blocks of 4 leaves a
ragged last block, so the internal padding is exercised.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import sinkhorn as sinkhorn_lib
from efficient_transformers.attention.softmax import softmax_attention
from efficient_transformers.errors import ConfigError
from tests.attention_reference import (
  BATCH,
  HEAD_DIM,
  HEADS,
  cotangent,
  dense_attention,
  make_mask,
  output_and_grads_fn,
  random_qkv,
  replace_future,
  replace_padded,
  train_temp_bytes,
)

LENGTH, BLOCK, NUM_BLOCKS, MAX_BLOCKS = 14, 4, 4, 6
# Hard permutations without fixed points, one per head; causal ones draw from earlier blocks.
PERMUTATIONS = {
  False: np.array([[1, 2, 3, 0], [3, 0, 1, 2]]),
  True: np.array([[-1, 0, 1, 2], [-1, 0, 0, 1]]),
}
# What Sinkhorn can converge to: a (causal: sub-)permutation, distinct blocks per row.
SINKHORN_PERMUTATIONS = {
  False: PERMUTATIONS[False],
  True: np.array([[-1, 0, 1, 2], [-1, 0, 1, 2]]),
}


def random_sort_weights(seed, heads=HEADS, head_dim=HEAD_DIM, max_blocks=MAX_BLOCKS, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal((heads, head_dim, max_blocks)), jnp.float32)


@functools.cache
def sinkhorn_runner(causal):
  """Jitted (q, k, v, mask, w) -> (output, grads of a weighted sum w.r.t. q, k, v, w, P).

  Cached per causal; the sort weights are an argument, so every test with the
  same shapes shares one compilation.
  """

  @jax.jit
  def run(q, k, v, mask, w):
    def fn(q, k, v, w):
      return sinkhorn_lib.sinkhorn_attention(q, k, v, w, mask=mask, causal=causal, block_size=BLOCK)

    out, vjp = jax.vjp(fn, q, k, v, w)
    p = sinkhorn_lib.sinkhorn_sort_matrix(k, w, mask=mask, causal=causal, block_size=BLOCK)
    return out, vjp(cotangent(out)), p

  return run


def full_mask(length=LENGTH):
  return jnp.ones((BATCH, length), bool)


@functools.cache
def hard_permutation_fns(causal):
  """(kernel with P fixed to the hard permutation, dense reference under its pattern)."""
  perm = PERMUTATIONS[causal]
  p = jnp.asarray(sinkhorn_lib.permutation_matrix(perm, NUM_BLOCKS))[None]  # [1, H, nb, nb]
  p = jnp.broadcast_to(p, (BATCH, *p.shape[1:]))
  kernel = functools.partial(sinkhorn_lib.sorted_block_attention, sort_matrix=p, block_size=BLOCK)
  pattern = sinkhorn_lib.sinkhorn_pattern(LENGTH, perm, block_size=BLOCK, causal=causal)
  reference = functools.partial(dense_attention, pattern=pattern)
  return kernel, reference


normalize = jax.jit(sinkhorn_lib.sinkhorn_normalize, static_argnames=("iterations", "causal"))


def test_sinkhorn_normalize_is_doubly_stochastic():
  log_r = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 5, 5)) * 2, jnp.float32)
  p = np.exp(np.asarray(normalize(log_r, iterations=8)))
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)  # the last step normalizes rows
  np.testing.assert_allclose(p.sum(-2), 1.0, atol=5e-2)
  p = np.exp(np.asarray(normalize(log_r, iterations=200)))
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-4)
  assert p.min() > 0
  # Masked rows and columns drop out: the rest equals Sinkhorn on the submatrix.
  keep = np.zeros((5, 5), bool)
  keep[:3, :3] = True
  sub = np.exp(np.asarray(normalize(log_r[..., :3, :3], iterations=8)))
  masked = np.exp(np.asarray(normalize(log_r, iterations=8, keep=jnp.asarray(keep))))
  np.testing.assert_allclose(masked[..., :3, :3], sub, atol=1e-6)
  np.testing.assert_array_equal(masked[..., ~keep], 0.0)


def test_causal_sinkhorn_normalize_uses_only_earlier_rows():
  rng = np.random.default_rng(1)
  log_r = rng.standard_normal((2, 6, 6)) * 2
  keep = jnp.asarray(np.tril(np.ones((6, 6), bool), k=-1))
  norm = functools.partial(normalize, iterations=8, causal=True)
  p = np.exp(np.asarray(norm(jnp.asarray(log_r, jnp.float32), keep=keep)))
  np.testing.assert_array_equal(p[:, ~np.asarray(keep)], 0.0)  # strictly lower triangular
  np.testing.assert_allclose(p[:, 1:].sum(-1), 1.0, atol=1e-5)  # row 0 has no block to draw
  for row in (1, 3):
    changed = log_r.copy()
    changed[:, row + 1 :] = rng.standard_normal(changed[:, row + 1 :].shape) * 5
    p2 = np.exp(np.asarray(norm(jnp.asarray(changed, jnp.float32), keep=keep)))
    np.testing.assert_allclose(p2[:, : row + 1], p[:, : row + 1], atol=1e-6)
    assert not np.allclose(p2[:, row + 1 :], p[:, row + 1 :], atol=1e-3)


def test_pattern_is_contiguous_blocks_and_hand_checked():
  # 8 tokens, blocks of 2: block a = tokens 2a, 2a+1 (contiguous, not strided as in LRA).
  p = sinkhorn_lib.sinkhorn_pattern(8, [2, 3, 0, 1], block_size=2, causal=False)
  np.testing.assert_array_equal(p[0], [1, 1, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(p[3], [0, 0, 1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(p[6], [0, 0, 1, 1, 0, 0, 1, 1])
  c = sinkhorn_lib.sinkhorn_pattern(8, [-1, 0, 0, 1], block_size=2, causal=True)
  np.testing.assert_array_equal(c[0], [1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(c[1], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(c[4], [1, 1, 0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(c[7], [0, 0, 1, 1, 0, 0, 1, 1])
  assert not (c & ~np.tril(np.ones((8, 8), bool))).any()
  np.testing.assert_array_equal(
    sinkhorn_lib.sinkhorn_pattern(14, [-1, 0, 0, 1], block_size=4, causal=True),
    sinkhorn_lib.sinkhorn_pattern(14, [-1, 0, 0, 1], block_size=4, causal=False)
    & np.tril(np.ones((14, 14), bool)),
  )


@pytest.mark.parametrize("mask_kind", ["none", "right_padding", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_hard_permutation_is_dense_attention_under_its_pattern(causal, mask_kind):
  kernel, reference = hard_permutation_fns(causal)
  q, k, v = random_qkv(1, LENGTH)
  # "none" as an all-real mask shares the compilation; mask=None is run elsewhere.
  mask = full_mask() if mask_kind == "none" else make_mask(mask_kind, LENGTH, seed=1)
  out, grads = output_and_grads_fn(kernel, causal)(q, k, v, mask)
  ref, ref_grads = output_and_grads_fn(reference, causal)(q, k, v, mask)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


def _block_embeddings(k, mask, causal):
  """Numpy block embeddings written from the definition: means of real keys."""
  k, real = np.asarray(k), np.asarray(mask)
  blk = np.arange(k.shape[1]) // BLOCK
  emb = np.zeros((k.shape[0], k.shape[2], NUM_BLOCKS, k.shape[3]))
  for a in range(NUM_BLOCKS):
    sel = real & ((blk < a) if causal else (blk == a))[None, :]
    emb[:, :, a] = np.einsum("bl,blhd->bhd", sel, k) / np.maximum(sel.sum(1), 1)[:, None, None]
  return emb


def _weights_sorting_to(perm, k, mask, causal, margin=30.0):
  """Sort weights W [heads, d, MAX_BLOCKS] whose sort logits are margin * onehot(perm[a])."""
  emb = _block_embeddings(k, mask, causal)
  rows = np.arange(1 if causal else 0, NUM_BLOCKS)
  w = np.asarray(random_sort_weights(2, head_dim=k.shape[-1]), np.float64)
  for h in range(k.shape[2]):
    e = emb[:, h, rows].reshape(-1, k.shape[-1])
    target = margin * (perm[h][rows][:, None] == np.arange(NUM_BLOCKS))
    w[h, :, :NUM_BLOCKS] = np.linalg.lstsq(e, np.tile(target, (k.shape[0], 1)), rcond=None)[0]
  return jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_with_a_clear_sort_is_the_hard_permutation(causal, padded):
  # Sort weights chosen so each row of R has one clear maximum: Sinkhorn at the
  # default temperature gives a hard permutation, and the whole kernel (values
  # and q/k/v gradients) is dense attention under its pattern.
  q, k, v = random_qkv(3, LENGTH)
  mask = np.ones((BATCH, LENGTH), bool)
  if padded:  # holes and right padding, but every block keeps a real token
    mask[0, [0, 5, 9, 13]] = False
    mask[1, 13:] = False
  mask = jnp.asarray(mask)
  perm = SINKHORN_PERMUTATIONS[causal]
  w = _weights_sorting_to(perm, k, mask, causal)
  out, grads, p = sinkhorn_runner(causal)(q, k, v, mask, w)
  expected = sinkhorn_lib.permutation_matrix(perm, NUM_BLOCKS)
  np.testing.assert_allclose(p, np.broadcast_to(expected, p.shape), atol=1e-6)
  pattern = sinkhorn_lib.sinkhorn_pattern(LENGTH, perm, block_size=BLOCK, causal=causal)
  reference = _dense_under(pattern.tobytes(), pattern.shape)
  ref, ref_grads = output_and_grads_fn(reference, causal)(q, k, v, mask)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads[:3], ref_grads, atol=1e-4, rtol=1e-4)


@functools.cache
def _dense_under(pattern_bytes, shape):
  pattern = np.frombuffer(pattern_bytes, bool).reshape(shape)
  return functools.partial(dense_attention, pattern=pattern)


@pytest.mark.parametrize("causal", [False, True])
def test_shape_and_finite_grads_including_sort_weights(causal):
  q, k, v = random_qkv(4, LENGTH)
  mask = make_mask("random", LENGTH, seed=4)
  out, grads, _ = sinkhorn_runner(causal)(q, k, v, mask, random_sort_weights(4))
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite((out, grads))
  g_w = np.asarray(grads[3])
  assert np.abs(g_w[:, :, :NUM_BLOCKS]).sum() > 0
  np.testing.assert_array_equal(g_w[:, :, NUM_BLOCKS:], 0.0)  # columns past nb are unused


@pytest.mark.parametrize("mask_kind", ["right_padding", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance_and_zero_padded_rows(causal, mask_kind):
  q, k, v = random_qkv(5, LENGTH)
  mask = make_mask(mask_kind, LENGTH, seed=5)
  w = random_sort_weights(5, scale=3.0)
  run = sinkhorn_runner(causal)
  out = np.asarray(run(q, k, v, mask, w)[0])
  out2, grads2, _ = run(*replace_padded((q, k, v), mask, seed=6), mask, w)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out2)[real], out[real], atol=1e-5)
  np.testing.assert_array_equal(out[~real], 0.0)
  np.testing.assert_array_equal(np.asarray(out2)[~real], 0.0)
  chex.assert_tree_all_finite(grads2)


@pytest.mark.parametrize("causal", [False, True])
def test_appending_padding_blocks_leaves_outputs_unchanged(causal):
  q, k, v = random_qkv(7, 12)
  junk = random_qkv(8, 9)
  longer = [jnp.concatenate([x, j], axis=1) for x, j in zip((q, k, v), junk, strict=True)]
  mask = jnp.asarray(np.arange(21)[None, :] < np.array([[12], [12]]))
  fn = jax.jit(
    functools.partial(
      sinkhorn_lib.sinkhorn_attention,
      sort_weights=random_sort_weights(7, scale=3.0),
      causal=causal,
      block_size=BLOCK,
    )
  )
  out = fn(q, k, v, mask=None)  # 3 blocks
  out_long = fn(*longer, mask=mask)  # 6 blocks, the last 3 (and a bit) padding
  np.testing.assert_allclose(np.asarray(out_long[:, :12]), np.asarray(out), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out_long[:, 12:]), 0.0)


@pytest.mark.parametrize("position", [6, 8])  # inside block 1; the first token of block 2
def test_causal_future_tokens_do_not_change_the_past(position):
  q, k, v = random_qkv(9, LENGTH)
  w = random_sort_weights(9, scale=3.0)
  changed = replace_future((q, k, v), position, seed=10)
  run = sinkhorn_runner(True)
  out = np.asarray(run(q, k, v, full_mask(), w)[0])
  out2 = np.asarray(run(*changed, full_mask(), w)[0])
  np.testing.assert_allclose(out2[:, : position + 1], out[:, : position + 1], atol=1e-6)
  assert not np.allclose(out2[:, position + 1 :], out[:, position + 1 :], atol=1e-3)
  # Not causal: the sort matrix sees every block, so the past does change.
  bidirectional = sinkhorn_runner(False)
  before = np.asarray(bidirectional(q, k, v, full_mask(), w)[0])
  after = np.asarray(bidirectional(*changed, full_mask(), w)[0])
  assert not np.allclose(after[:, :position], before[:, :position], atol=1e-3)


def test_fully_masked_sequence_is_zero_not_nan():
  q, k, v = random_qkv(11, LENGTH)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1] = False
  for causal in (False, True):
    out, grads, _ = sinkhorn_runner(causal)(q, k, v, jnp.asarray(mask), random_sort_weights(11))
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    chex.assert_tree_all_finite((out, grads))


@functools.cache
def _default_sinkhorn():
  # LRA-like defaults: blocks of 64, max_length 4096 (64 sort columns).
  return functools.partial(
    sinkhorn_lib.sinkhorn_attention,
    sort_weights=random_sort_weights(12, heads=1, head_dim=16, max_blocks=64),
    block_size=64,
  )


def test_compiled_memory_is_subquadratic():
  soft = train_temp_bytes(softmax_attention, 4096)
  mem, mem_2x = (train_temp_bytes(_default_sinkhorn(), n) for n in (2048, 4096))
  print(f"temp bytes: softmax(4096) {soft}; sinkhorn {mem} -> {mem_2x}")
  assert mem_2x < 2.6 * mem
  assert mem_2x < 0.25 * soft


def build(causal=False, **kwargs):
  kwargs = dict(block_size=BLOCK, max_length=24) | kwargs
  return attention.make(
    "sinkhorn",
    in_features=16,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


@nnx.jit
def _module_outputs(module, x, mask):
  def loss(m):
    y = m(x, mask=mask)
    return (y**2).sum(), y

  grads, y = nnx.grad(loss, has_aux=True)(module)
  return y, module.sort_matrix(x, mask=mask), grads


@pytest.mark.parametrize("causal", [False, True])
def test_module_shape_grads_and_sort_matrix(causal):
  x = jnp.asarray(np.random.default_rng(13).standard_normal((BATCH, 23, 16)), jnp.float32)
  mask = make_mask("right_padding", 23)
  module = build(causal=causal, max_length=40)  # 10 sort columns
  assert "sinkhorn" in attention.available()
  assert type(module) is attention.get_class("sinkhorn")
  assert module.sort_weights.value.shape == (HEADS, HEAD_DIM, 10)
  assert module.sort_weights.get_metadata()["out_sharding"] == ("heads", "kv", None)
  y, p, grads = _module_outputs(module, x, mask)
  chex.assert_shape(y, x.shape)
  chex.assert_tree_all_finite((y, nnx.to_pure_dict(grads)))
  perm = [-1, 0, 1, 2, 3, 4] if causal else [5, 0, 1, 2, 3, 4]
  pattern = sinkhorn_lib.sinkhorn_pattern(23, perm, block_size=BLOCK, causal=causal)
  np.testing.assert_array_equal(module.pattern(23, perm), pattern)
  g_w = np.asarray(grads.sort_weights.value)
  assert np.abs(g_w[..., :6]).sum() > 0
  np.testing.assert_array_equal(g_w[..., 6:], 0.0)  # columns past the 6 blocks are unused
  # 23 tokens = 6 blocks of 4; row 1 has 12 real tokens = 3 blocks.
  chex.assert_shape(p, (BATCH, HEADS, 6, 6))
  rows = np.asarray(p).sum(-1)
  real_rows = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], bool)
  if causal:
    real_rows[:, 0] = False  # the first block draws from no earlier block
  np.testing.assert_allclose(rows[real_rows[:, None, :].repeat(HEADS, 1)], 1.0, atol=1e-5)
  np.testing.assert_array_equal(rows[~real_rows[:, None, :].repeat(HEADS, 1)], 0.0)


@pytest.mark.parametrize(
  "param, value",
  [
    ("block_size", 0),
    ("block_size", -3),
    ("block_size", 2.5),
    ("max_length", 0),
    ("sinkhorn_iterations", 0),
    ("temperature", 0.0),
    ("temperature", -1.0),
    ("temperature", "hot"),
  ],
)
def test_invalid_params_raise_config_error(param, value):
  with pytest.raises(ConfigError, match=f"'sinkhorn'.*{param}"):
    build(**{param: value})
  if param != "max_length":
    q, k, v = random_qkv(14, LENGTH)
    with pytest.raises(ConfigError, match=f"'sinkhorn'.*{param}"):
      sinkhorn_lib.sinkhorn_attention(q, k, v, random_sort_weights(0), **{param: value})


def test_too_long_inputs_raise_config_error():
  q, k, v = random_qkv(15, LENGTH)
  with pytest.raises(ConfigError, match="'sinkhorn'.*block_size=16.*sequence length 14"):
    sinkhorn_lib.sinkhorn_attention(q, k, v, random_sort_weights(0), block_size=16)
  with pytest.raises(ConfigError, match="'sinkhorn'.*max_length"):  # 4 blocks > 3 columns
    sinkhorn_lib.sinkhorn_attention(q, k, v, random_sort_weights(0, max_blocks=3), block_size=4)
  module = build(max_length=12)
  with pytest.raises(ConfigError, match="'sinkhorn'.*length 14 exceeds max_length=12"):
    module(jnp.zeros((BATCH, LENGTH, 16)))


def test_make_unknown_kwarg_names_the_variant():
  with pytest.raises(ConfigError, match="'sinkhorn'.*num_neighbors"):
    build(num_neighbors=1)
