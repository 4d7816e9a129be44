"""Reformer LSH attention against full shared-QK attention, and its randomness.

The exactness limit is one chunk covering the sequence: every query sees
every key whatever the hash, so the kernel must equal dense shared-QK
attention (keys = normalized queries; a token sees itself only when no other
key is visible). With smaller chunks the kernel only approximates it, and the
approximation must improve with more hashing rounds. Lengths are chosen so
the chunk size does not divide them (internal padding is exercised).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import reformer as reformer_lib
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

LENGTH = 37  # 9 chunks of 4 and a ragged one
SMALL = dict(chunk_size=4, num_buckets=4)


def rotations(seed, num_hashes, num_buckets, heads=HEADS):
  """Gaussian rotations drawn with numpy: no PRNG kernel to compile (slow on CPU)."""
  shape = (heads, num_hashes, HEAD_DIM, num_buckets // 2)
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.cache
def reformer_fn(seed=0, *, num_hashes=2, num_buckets=4, chunk_size=4):
  """fn(q, k, v, *, mask, causal) for the shared helpers: k is unused, rotations fixed."""
  rot = rotations(seed, num_hashes, num_buckets)

  def fn(q, k, v, *, mask, causal):
    del k  # shared QK
    return reformer_lib.reformer_attention_from_rotations(
      q, v, rot, mask=mask, causal=causal, chunk_size=chunk_size
    )

  return fn


@functools.cache
def keyed_fn(**kwargs):
  """fn(q, k, v, *, mask, causal) over `reformer_attention` with a fixed key."""

  def fn(q, k, v, *, mask, causal):
    del k
    key = jax.random.key(0)
    return reformer_lib.reformer_attention(q, v, key=key, mask=mask, causal=causal, **kwargs)

  return fn


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def shared_qk_reference(q, k, v, *, mask, causal):
  """Full shared-QK attention: keys q/|q|; self excluded unless it is the only visible key."""
  del k
  length = q.shape[1]
  not_self = ~np.eye(length, dtype=bool)
  out = dense_attention(q, _unit(q), v, mask=mask, causal=causal, pattern=not_self)
  allowed = not_self & (np.tril(np.ones((length, length), bool)) if causal else True)
  real = jnp.ones(q.shape[:2], bool) if mask is None else mask
  has_other = (jnp.asarray(allowed)[None] & real[:, None, :]).any(axis=-1)  # [batch, length]
  out = jnp.where(has_other[:, :, None, None], out, v)  # alone: attends to itself
  return jnp.where(real[:, :, None, None], out, 0.0)


def _run(fn, causal, q, k, v, mask):
  return output_and_grads_fn(fn, causal)(q, k, v, mask)


@pytest.mark.parametrize("causal", [False, True])
def test_shape_finite_grads_and_no_key_gradient(causal):
  q, k, v = random_qkv(1, LENGTH)
  mask = make_mask("random", LENGTH, seed=1)
  out, (dq, dk, dv) = _run(reformer_fn(**SMALL), causal, q, k, v, mask)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite((out, dq, dv))
  np.testing.assert_array_equal(np.asarray(dk), 0.0)  # keys are the queries
  assert np.abs(np.asarray(dq)).max() > 1e-3 and np.abs(np.asarray(dv)).max() > 1e-3


@pytest.mark.parametrize("mask_kind", ["none", "right_padding", "random"])
def test_one_chunk_one_round_is_full_shared_qk_attention(mask_kind):
  q, k, v = random_qkv(2, LENGTH)
  mask = make_mask(mask_kind, LENGTH, seed=2)
  if mask is None:
    mask = jnp.ones((BATCH, LENGTH), bool)
  fn = reformer_fn(num_hashes=1, num_buckets=8, chunk_size=LENGTH)
  out, grads = _run(fn, False, q, k, v, mask)
  ref, ref_grads = _run(shared_qk_reference, False, q, k, v, mask)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


def causal_lsh_reference(q, v, rot, mask, chunk_size):
  """A naive loop over queries of the causal rule: per round, the query itself and the
  `chunk_size` latest earlier real tokens of its bucket; rounds combined by log-sum-exp."""
  q, v = np.asarray(q, np.float64), np.asarray(v, np.float64)
  buckets = np.asarray(reformer_lib.hash_buckets(jnp.asarray(q, jnp.float32), rot))
  keys = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
  real = np.asarray(mask)
  batch, length, heads, dim = q.shape
  out = np.zeros_like(q)
  for b, h, i in np.ndindex(batch, heads, length):
    if not real[b, i]:
      continue
    outs, lses = [], []
    for r in range(rot.shape[1]):
      same = [j for j in range(i) if real[b, j] and buckets[b, h, r, j] == buckets[b, h, r, i]]
      window = same[-chunk_size:]
      logits = [keys[b, j, h] @ q[b, i, h] / np.sqrt(dim) for j in window]
      logits.append(reformer_lib.SELF_LOGIT)  # itself: weight only when alone
      logits = np.asarray(logits)
      lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
      values = np.stack([v[b, j, h] for j in window] + [v[b, i, h]])
      outs.append(np.exp(logits - lse) @ values)
      lses.append(lse)
    w = np.exp(np.asarray(lses) - max(lses))
    out[b, i, h] = (w[:, None] * np.stack(outs)).sum(0) / w.sum()
  return out


@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("chunk_size", [4, LENGTH])
def test_causal_rule_matches_a_naive_loop(mask_kind, chunk_size):
  q, _, v = random_qkv(2, LENGTH)
  mask = make_mask(mask_kind, LENGTH, seed=2)
  mask = jnp.ones((BATCH, LENGTH), bool) if mask is None else mask
  rot = rotations(0, num_hashes=2, num_buckets=4)
  out = jax.jit(functools.partial(_from_rotations, causal=True, chunk_size=chunk_size))(
    q, v, rot, mask=mask
  )
  ref = causal_lsh_reference(q, v, rot, mask, chunk_size)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_one_chunk_is_exact_whatever_the_hash_and_rounds():
  q, k, v = random_qkv(3, LENGTH)
  mask = make_mask("random", LENGTH, seed=3)
  ref = shared_qk_reference(q, k, v, mask=mask, causal=False)
  fn = jax.jit(functools.partial(_from_rotations, mask=mask, chunk_size=LENGTH))
  for seed in (0, 1):
    out = fn(q, v, rotations(seed, num_hashes=3, num_buckets=8))
    chex.assert_trees_all_close(out, ref, atol=1e-5)


def _attention(q, v, key, **kwargs):
  return reformer_lib.reformer_attention(q, v, key=key, **kwargs)


def _from_rotations(q, v, rot, **kwargs):
  return reformer_lib.reformer_attention_from_rotations(q, v, rot, **kwargs)


@pytest.mark.parametrize("mask_kind", ["right_padding", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance_and_zero_padded_rows(causal, mask_kind):
  q, k, v = random_qkv(4, LENGTH)
  mask = make_mask(mask_kind, LENGTH, seed=4)
  run = output_and_grads_fn(reformer_fn(**SMALL), causal)
  out = np.asarray(run(q, k, v, mask)[0])
  out2 = np.asarray(run(*replace_padded((q, k, v), mask, seed=5), mask)[0])
  real = np.asarray(mask)
  np.testing.assert_allclose(out2[real], out[real], atol=1e-6)
  np.testing.assert_array_equal(out[~real], 0.0)
  np.testing.assert_array_equal(out2[~real], 0.0)


def test_right_padding_gives_the_unpadded_sequence():
  # Padded tokens sort after every real one, so the real tokens' chunks (and
  # the rotations, whose shape does not depend on the length) are unchanged.
  q, _, v = random_qkv(6, LENGTH)
  mask = make_mask("right_padding", LENGTH)
  n = LENGTH - 11

  @jax.jit
  def both(q, v, mask, rot):
    return [_from_rotations(q, v, rot, mask=mask, causal=c, chunk_size=4) for c in (False, True)]

  rot = rotations(0, num_hashes=2, num_buckets=4)
  padded = both(q, v, mask, rot)
  alone = both(q[1:, :n], v[1:, :n], jnp.ones((1, n), bool), rot)
  for out, out_alone in zip(padded, alone, strict=True):
    np.testing.assert_allclose(np.asarray(out[1, :n]), np.asarray(out_alone[0]), atol=1e-6)


@pytest.mark.parametrize("chunk_size", [4, LENGTH])
def test_causal_future_tokens_do_not_change_the_past(chunk_size):
  # Several chunks included: the window is past tokens of the query's own bucket,
  # so no future token can move a past one to another chunk (the paper's rule
  # moved past outputs by 2.5 at L=32 with 2 hashes).
  q, k, v = random_qkv(7, LENGTH)
  mask = jnp.ones((BATCH, LENGTH), bool)
  p = 17
  fn = reformer_fn(num_hashes=2, num_buckets=4, chunk_size=chunk_size)
  past = lambda q, v: fn(q, None, v, mask=mask, causal=True)[:, : p + 1].sum()
  dq, dv = jax.jit(jax.grad(past, argnums=(0, 1)))(q, v)
  np.testing.assert_array_equal(np.asarray(dq[:, p + 1 :]), 0.0)
  np.testing.assert_array_equal(np.asarray(dv[:, p + 1 :]), 0.0)
  assert np.abs(np.asarray(dv[:, : p + 1])).max() > 1e-3
  run = output_and_grads_fn(fn, True)
  out = np.asarray(run(q, k, v, mask)[0])
  for seed in (8, 9, 10):  # Future queries change their buckets, hence the sort.
    out2 = np.asarray(run(*replace_future((q, k, v), p, seed=seed), mask)[0])
    # Rounding only: the sorted order (so the order of summation) moves.
    np.testing.assert_allclose(out2[:, : p + 1], out[:, : p + 1], atol=1e-6)
    assert not np.allclose(out2[:, p + 1 :], out[:, p + 1 :], atol=1e-3)


def test_agreement_with_full_attention_rises_with_num_hashes():
  # Measured (8 keys, L=64, chunk 8, 8 buckets): mean |error| 0.198, 0.137,
  # 0.103, 0.080 for 1, 2, 4, 8 rounds.
  length = 64
  q, k, v = random_qkv(3, length)
  ref = shared_qk_reference(q, k, v, mask=None, causal=False)
  errors = []
  for num_hashes in (1, 2, 4, 8):
    batched = jax.jit(jax.vmap(lambda rot: _from_rotations(q, v, rot, chunk_size=8)))
    outs = batched(jnp.stack([rotations(s, num_hashes, num_buckets=8) for s in range(8)]))
    errors.append(float(jnp.abs(outs - ref[None]).mean()))
  assert errors == sorted(errors, reverse=True), errors
  assert errors[-1] < 0.6 * errors[0], errors


def test_same_key_same_output_different_key_different_output():
  q, _, v = random_qkv(11, LENGTH)
  fn = jax.jit(functools.partial(_attention, **SMALL))
  a, b = fn(q, v, jax.random.key(0)), fn(q, v, jax.random.key(0))
  c = fn(q, v, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c), atol=1e-3)


def test_buckets_are_argmax_of_rotation_and_its_negation():
  rotations = jnp.eye(4)[None, None, :, :2]  # [heads 1, rounds 1, d 4, 2]: x R = x[:2]
  q = jnp.asarray([[3.0, 1, 0, 0], [0, 2, 0, 0], [-3, 1, 0, 0], [0, -2, 5, 0]])[None, :, None]
  buckets = reformer_lib.hash_buckets(q, rotations)
  np.testing.assert_array_equal(np.asarray(buckets)[0, 0, 0], [0, 1, 2, 3])


def test_memory_growth_is_linear_and_far_below_softmax():
  fn = keyed_fn(num_hashes=2, num_buckets=32, chunk_size=64)
  mem, mem_2x = (train_temp_bytes(fn, n) for n in (2048, 4096))
  soft_2x = train_temp_bytes(softmax_attention, 4096)
  print(f"temp bytes: reformer {mem} -> {mem_2x}; softmax(4096) {soft_2x}")
  assert mem_2x < 2.6 * mem
  assert mem_2x < 0.25 * soft_2x


def _build(causal=False, rngs=None, **kwargs):
  return attention.make(
    "reformer",
    in_features=16,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(params=0, dropout=1) if rngs is None else rngs,
    **kwargs,
  )


@nnx.jit
def _output_and_grads(module, x, mask):
  def loss(m):
    y = m(x, mask=mask)
    return (y**2).sum(), y

  (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(module)
  return y, grads


def test_module_shape_grads_and_no_key_projection():
  x = jnp.asarray(np.random.default_rng(12).standard_normal((BATCH, 20, 16)), jnp.float32)
  mask = make_mask("right_padding", 20)
  module = _build(causal=True, **SMALL)
  assert "reformer" in attention.available()
  assert type(module) is attention.get_class("reformer")
  assert not hasattr(module, "key")
  y, grads = _output_and_grads(module, x, mask)
  chex.assert_shape(y, x.shape)
  params = nnx.to_pure_dict(nnx.state(grads, nnx.Param))
  assert set(params) == {"query", "value", "out"}
  chex.assert_tree_all_finite(params)
  for name in ("query", "value"):
    assert np.abs(np.asarray(params[name]["kernel"])).max() > 1e-4, name


def test_module_draws_fresh_rotations_and_reseed_reproduces():
  x = jnp.asarray(np.random.default_rng(13).standard_normal((BATCH, 20, 16)), jnp.float32)
  module = _build(**SMALL)
  call = nnx.jit(lambda m, x: m(x))
  first, second = call(module, x), call(module, x)
  assert not np.allclose(np.asarray(first), np.asarray(second), atol=1e-3)  # stream advanced
  nnx.reseed(module, dropout=7)
  a = call(module, x)
  nnx.reseed(module, dropout=7)
  b = call(module, x)
  nnx.reseed(module, dropout=8)
  c = call(module, x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c), atol=1e-3)
  # With a single `default` stream, the hashing stream is still a "dropout" one.
  assert _build(rngs=nnx.Rngs(0), **SMALL).hash_rngs.tag == "dropout"


def test_module_appended_padding_holds_per_draw_not_across_calls():
  # 29 real tokens in chunks of 8, padded to 40 and to 64. From the same stream state
  # the real outputs agree (float32 reordering only); two calls in a row hash with two
  # draws, so they differ (~1 here) whatever the padding: that is the hash, by design.
  module = _build(chunk_size=8, num_buckets=4)
  x = jnp.asarray(np.random.default_rng(16).standard_normal((BATCH, 64, 16)), jnp.float32)
  mask = jnp.asarray(np.arange(64)[None, :] < np.array([[29], [20]]))
  call = nnx.jit(lambda m, x, mask: m(x, mask=mask))
  outs = []
  for length in (40, 64):
    nnx.reseed(module, dropout=3)
    outs.append(np.asarray(call(module, x[:, :length], mask[:, :length])))
  real = np.asarray(mask[:, :40])
  np.testing.assert_allclose(outs[1][:, :40][real], outs[0][real], atol=1e-5)
  next_call = np.asarray(call(module, x, mask))  # the stream has moved on
  assert np.abs(next_call[:, :40][real] - outs[0][real]).max() > 0.1


@pytest.mark.parametrize(
  "param, value",
  [
    ("num_hashes", 0),
    ("num_hashes", 1.5),
    ("num_buckets", 3),
    ("num_buckets", 0),
    ("num_buckets", -4),
    ("chunk_size", 0),
    ("chunk_size", -2),
  ],
)
def test_invalid_params_raise_config_error(param, value):
  with pytest.raises(ConfigError, match=f"'reformer'.*{param}"):
    _build(**{param: value})
  q, _, v = random_qkv(14, LENGTH)
  with pytest.raises(ConfigError, match=f"'reformer'.*{param}"):
    reformer_lib.reformer_attention(q, v, key=jax.random.key(0), **{param: value})


def test_chunk_larger_than_sequence_raises_config_error():
  q, _, v = random_qkv(15, LENGTH)
  with pytest.raises(ConfigError, match="'reformer'.*chunk_size=64.*sequence length 37"):
    reformer_lib.reformer_attention(q, v, key=jax.random.key(0))
  module = _build()
  with pytest.raises(ConfigError, match="'reformer'.*chunk_size"):
    module(jnp.zeros((BATCH, LENGTH, 16)))


def test_make_unknown_kwarg_names_the_variant():
  with pytest.raises(ConfigError, match="'reformer'.*n_hashes"):
    _build(n_hashes=4)
