"""Performer (FAVOR+): exact linear algebra given its features, and an estimator of softmax.

Two kinds of check. Given the random features, the output must equal a
naive L x L reference built from the unstabilized feature maps of the paper
(so the numerical stabilizers must cancel exactly). Over random draws, the
output must approach exact softmax attention as the number of features
grows, faster with orthogonal features than with iid ones.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import performer as performer_lib
from efficient_transformers.attention.softmax import softmax_attention
from efficient_transformers.errors import ConfigError
from tests import attention_reference as reference

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 37, 2, 8
NUM_FEATURES = 24  # three orthogonal blocks of HEAD_DIM
FEATURES = performer_lib.draw_random_features(jax.random.key(0), NUM_FEATURES, HEAD_DIM)


def reference_phi(x, w, kernel):
  """The paper's feature maps, without any stabilizer; [batch, length, heads, m]."""
  m = w.shape[0]
  if kernel == "relu":
    return jax.nn.relu(jnp.einsum("blhd,md->blhm", x, w)) / math.sqrt(m) + 1e-3
  x = x * x.shape[-1] ** -0.25
  sq_norm = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  return jnp.exp(jnp.einsum("blhd,md->blhm", x, w) - sq_norm) / math.sqrt(m)


def reference_performer(q, k, v, *, mask=None, causal=False, kernel="softmax"):
  """Rows of the explicit L x L matrix phi(q) phi(k)^T, masked and normalized, times v."""
  scores = jnp.einsum(
    "bqhm,bkhm->bhqk", reference_phi(q, FEATURES, kernel), reference_phi(k, FEATURES, kernel)
  )
  q_len, kv_len = q.shape[1], k.shape[1]
  keep = np.ones((1, 1, q_len, kv_len), bool)
  if causal:
    keep = keep & np.tril(np.ones((q_len, kv_len), bool))
  if mask is not None:
    keep = keep & mask[:, None, None, :]
  scores = jnp.where(keep, scores, 0.0)
  denom = scores.sum(axis=-1, keepdims=True)
  out = jnp.einsum("bhqk,bkhd->bqhd", scores / jnp.where(denom > 0, denom, 1.0), v)
  if mask is not None:
    out = jnp.where(mask[:, :, None, None], out, 0.0)
  return out


def performer(kernel, chunk_size=7):
  return functools.partial(
    performer_lib.performer_attention,
    features=FEATURES,
    kernel=kernel,
    chunk_size=chunk_size,
  )


PERFORMER = {kernel: performer(kernel) for kernel in performer_lib.KERNELS}
REFERENCE = {
  kernel: functools.partial(reference_performer, kernel=kernel) for kernel in performer_lib.KERNELS
}


def random_qkv(seed, length=LENGTH, scale=1.0):
  rng = np.random.default_rng(seed)
  shape = (BATCH, length, HEADS, HEAD_DIM)
  return tuple(
    jnp.asarray(rng.standard_normal(shape) * s, jnp.float32) for s in (scale, scale, 1.0)
  )


def random_mask(seed, length=LENGTH):
  """Arbitrary holes, including a masked first key (an empty causal row)."""
  mask = np.random.default_rng(seed).random((BATCH, length)) < 0.6
  mask[:, 0] = False
  mask[0, 5] = True
  return jnp.asarray(mask)


@functools.cache
def _jitted_output_and_grads(fn, causal):
  weights = np.random.default_rng(7).standard_normal((HEADS, HEAD_DIM))

  @jax.jit
  def run(q, k, v, mask):
    out, vjp = jax.vjp(lambda *qkv: fn(*qkv, mask=mask, causal=causal), q, k, v)
    return out, vjp(jnp.broadcast_to(jnp.asarray(weights, out.dtype), out.shape))

  return run


def output_and_grads(fn, q, k, v, *, mask=None, causal=False):
  """fn's output and the gradients w.r.t. q, k, v of a weighted sum of it."""
  return _jitted_output_and_grads(fn, causal)(q, k, v, mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", performer_lib.KERNELS)
def test_matches_feature_space_reference(kernel, causal):
  q, k, v = random_qkv(seed=1)
  mask = random_mask(seed=1)
  out, grads = output_and_grads(PERFORMER[kernel], q, k, v, mask=mask, causal=causal)
  ref, ref_grads = output_and_grads(REFERENCE[kernel], q, k, v, mask=mask, causal=causal)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
  # Padded query rows and the empty causal row are zeros, not NaN.
  np.testing.assert_array_equal(np.asarray(out)[~np.asarray(mask)], 0.0)


@functools.cache
def _squared_errors(num_features, orthogonal, causal, num_seeds):
  """Mean squared error against softmax attention, one per feature draw (one compile)."""
  q, k, v = random_qkv(seed=2, scale=0.5)  # small |q|, |k|: a low-variance regime
  mask = random_mask(seed=2)
  exact = softmax_attention(q, k, v, mask=mask, causal=causal)
  keys = jax.random.split(jax.random.key(num_features), num_seeds)

  @jax.jit
  @jax.vmap
  def error(key):
    w = performer_lib.draw_random_features(key, num_features, HEAD_DIM, orthogonal=orthogonal)
    out = performer_lib.performer_attention(q, k, v, w, mask=mask, causal=causal)
    return jnp.square(out - exact).mean()

  return np.asarray(error(keys))


@pytest.mark.parametrize("causal", [False, True])
def test_error_against_softmax_falls_with_num_features(causal):
  # Fewer draws where the variance is small (and the compile larger).
  seeds = {16: 16, 256: 4, 2048: 4}
  rmse = [np.sqrt(_squared_errors(m, True, causal, n).mean()) for m, n in seeds.items()]
  assert rmse[0] > 2 * rmse[1], rmse
  assert rmse[1] > 1.5 * rmse[2], rmse
  assert rmse[2] < 0.02, rmse


def test_orthogonal_features_beat_iid():
  # Same number of features (two blocks of HEAD_DIM), averaged over draws.
  orthogonal = _squared_errors(16, True, False, 16).mean()
  iid = _squared_errors(16, False, False, 16).mean()
  assert orthogonal < 0.9 * iid, (orthogonal, iid)


def test_orthogonal_features_are_orthogonal_blocks_with_chi_norms():
  w = np.asarray(performer_lib.draw_random_features(jax.random.key(3), 20, HEAD_DIM))
  assert w.shape == (20, HEAD_DIM)
  for block in (w[:8], w[8:16], w[16:]):  # the last block is truncated to 4 rows
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  # Norms are not all equal (rescaled rows, not unit vectors).
  assert np.std(np.linalg.norm(w, axis=1)) > 0.1


@pytest.mark.parametrize("causal", [False, True])
def test_values_at_padded_positions_do_not_matter(causal):
  q, k, v = random_qkv(seed=4)
  mask = random_mask(seed=4)
  junk = random_qkv(seed=5)
  padded = ~mask[:, :, None, None]
  q2, k2, v2 = (jnp.where(padded, 30.0 * j, x) for x, j in zip((q, k, v), junk, strict=True))
  fn = PERFORMER["softmax"]
  out, _ = output_and_grads(fn, q, k, v, mask=mask, causal=causal)
  out2, grads2 = output_and_grads(fn, q2, k2, v2, mask=mask, causal=causal)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out2)[real], np.asarray(out)[real], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out2)[~real], 0.0)
  chex.assert_tree_all_finite(grads2)


def test_causal_outputs_ignore_future_tokens():
  q, k, v = random_qkv(seed=6)
  cut = 17
  junk = random_qkv(seed=7, scale=3.0)  # large future keys must not rescale past ones
  future = (np.arange(LENGTH) >= cut)[None, :, None, None]
  q2, k2, v2 = (jnp.where(future, j, x) for x, j in zip((q, k, v), junk, strict=True))
  fn = PERFORMER["softmax"]
  out, _ = output_and_grads(fn, q, k, v, causal=True)
  out2, _ = output_and_grads(fn, q2, k2, v2, causal=True)
  np.testing.assert_allclose(np.asarray(out2[:, :cut]), np.asarray(out[:, :cut]), atol=1e-6)
  assert not np.allclose(np.asarray(out2[:, cut:]), np.asarray(out[:, cut:]), atol=1e-3)


def _build(seed=0, causal=False, **kwargs):
  return attention.make(
    "performer",
    in_features=16,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(seed),
    **kwargs,
  )


@nnx.jit
def module_output_and_grads(module, x, mask):
  def loss(module):
    return jnp.sum(module(x, mask=mask) ** 2)

  return module(x, mask=mask), nnx.grad(loss)(module)


def test_module_shape_grads_and_non_trainable_features():
  module = _build(causal=True, num_features=32, kernel="relu", chunk_size=5)
  assert type(module) is performer_lib.PerformerAttention
  assert isinstance(module.features, performer_lib.RandomFeatures)
  assert not isinstance(module.features, nnx.Param)
  assert module.features[...].shape == (32, HEAD_DIM)
  assert "features" not in nnx.state(module, nnx.Param)
  assert "features" in nnx.state(module, performer_lib.RandomFeatures)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((BATCH, 23, 16)), jnp.float32)
  mask = jnp.asarray(np.arange(23)[None, :] < np.array([[23], [12]]))
  y, grads = module_output_and_grads(module, x, mask)
  chex.assert_shape(y, x.shape)
  chex.assert_tree_all_finite((y, grads))
  assert "features" not in grads
  assert float(jnp.abs(grads["query"]["kernel"][...]).sum()) > 0


def test_features_come_from_rngs_and_redraw_changes_them():
  features = lambda module: np.asarray(module.features[...])
  a, a_again, b = _build(seed=0), _build(seed=0), _build(seed=1)
  np.testing.assert_array_equal(features(a), features(a_again))
  assert not np.allclose(features(a), features(b))
  before = features(a)
  a.redraw_features(jax.random.key(42))
  assert features(a).shape == before.shape
  assert not np.allclose(features(a), before)
  iid = _build(seed=0, orthogonal=False)
  assert not np.allclose(features(iid), before)


@pytest.mark.parametrize(
  "kwargs, param",
  [
    (dict(num_features=0), "num_features"),
    (dict(num_features=-3), "num_features"),
    (dict(num_features=2.5), "num_features"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(kernel="exp"), "kernel"),
  ],
)
def test_invalid_kwargs_raise(kwargs, param):
  with pytest.raises(ConfigError, match=f"'performer'.*{param}"):
    _build(**kwargs)
  if param != "num_features":
    q, k, v = random_qkv(seed=9)
    with pytest.raises(ConfigError, match=f"'performer'.*{param}"):
      performer_lib.performer_attention(q, k, v, FEATURES, **kwargs)


def test_make_after_import():
  assert "performer" in attention.available()
  with pytest.raises(ConfigError, match="'performer'.*redraw"):
    _build(redraw=True)


_train_temp_bytes = reference.train_temp_bytes

_FEATURES_16 = performer_lib.draw_random_features(jax.random.key(0), 256, 16)


def _performer_256(q, k, v, *, mask, causal):
  return performer_lib.performer_attention(q, k, v, _FEATURES_16, mask=mask, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_memory_is_subquadratic(causal):
  soft_2x = _train_temp_bytes(softmax_attention, 4096, False)
  perf, perf_2x = (_train_temp_bytes(_performer_256, n, causal) for n in (2048, 4096))
  assert perf_2x < 2.6 * perf
  assert perf_2x < 0.25 * soft_2x
