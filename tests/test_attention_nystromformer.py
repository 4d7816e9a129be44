"""Nystromformer: shapes, padding, exactness limit, convergence in landmarks, memory, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import nystromformer as nystromformer_lib
from efficient_transformers.attention import softmax as softmax_lib
from efficient_transformers.errors import ConfigError
from tests import attention_reference as reference

BATCH, LENGTH, HEADS, HEAD_DIM, FEATURES = 2, 32, 2, 8, 16


def random_qkv(seed, length=LENGTH):
  rng = np.random.default_rng(seed)
  shape = (BATCH, length, HEADS, HEAD_DIM)
  return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))


def random_mask(seed, length=LENGTH):
  mask = np.random.default_rng(seed).random((BATCH, length)) < 0.6
  mask[0, 3] = True
  mask[1, 0] = False
  return jnp.asarray(mask)


nystromformer = jax.jit(
  nystromformer_lib.nystromformer_attention,
  static_argnames=("num_landmarks", "pinv_iterations", "causal"),
)
softmax = jax.jit(softmax_lib.softmax_attention)


def rms(x):
  return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def build(seed=0, **kwargs):
  return attention.make(
    "nystromformer",
    in_features=FEATURES,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    rngs=nnx.Rngs(seed),
    **kwargs,
  )


@nnx.jit
def apply(module, x, mask):
  return module(x, mask=mask)


def test_one_landmark_per_token_is_exact_softmax_with_padding():
  q, k, v = random_qkv(seed=1)
  mask = random_mask(seed=1)
  out = nystromformer(q, k, v, mask=mask, num_landmarks=LENGTH, pinv_iterations=30)
  ref = softmax(q, k, v, mask=mask)
  # Meaningful: fewer landmarks miss by ~0.2 RMS (next test).
  chex.assert_trees_all_close(out, ref, atol=1e-3, rtol=1e-3)


def test_error_decreases_with_more_landmarks():
  # No padding (an all-True mask shares the compilations of the other tests);
  # m = L with a converged pseudo-inverse is the exactness limit.
  q, k, v = random_qkv(seed=2)
  ones = jnp.ones((BATCH, LENGTH), bool)
  ref = softmax(q, k, v, mask=ones)
  errors = [rms(nystromformer(q, k, v, mask=ones, num_landmarks=m) - ref) for m in (4, 8)]
  exact = nystromformer(q, k, v, mask=ones, num_landmarks=LENGTH, pinv_iterations=30)
  errors.append(rms(exact - ref))
  assert errors == sorted(errors, reverse=True), errors
  assert errors[0] > 0.1 and errors[-1] < 1e-3, errors


def test_padding_invariance_and_padded_queries_zero():
  q, k, v = random_qkv(seed=3)
  mask = random_mask(seed=3)
  out = nystromformer(q, k, v, mask=mask, num_landmarks=4)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite(out)
  q2, k2, v2 = random_qkv(seed=4)
  pad = ~mask[:, :, None, None]
  changed = nystromformer(
    jnp.where(pad, q2, q), jnp.where(pad, k2, k), jnp.where(pad, v2, v), mask=mask, num_landmarks=4
  )
  chex.assert_trees_all_close(changed, out, atol=1e-5, rtol=1e-5)
  padded = ~np.asarray(mask)
  np.testing.assert_array_equal(np.asarray(out)[padded], 0.0)
  assert np.all(np.abs(np.asarray(out)[~padded]).sum(axis=(1, 2)) > 0)


def test_appending_padding_leaves_real_tokens_unchanged():
  # 25 real tokens: not divisible by the 4 landmarks; segments follow the real tokens.
  real = 25
  q, k, v = random_qkv(seed=5)
  ones = jnp.ones((BATCH, real), bool)
  short = nystromformer(q[:, :real], k[:, :real], v[:, :real], mask=ones, num_landmarks=4)
  tail = jnp.asarray(np.arange(LENGTH)[None, :].repeat(BATCH, 0) < real)
  long = nystromformer(q, k, v, mask=tail, num_landmarks=4)
  chex.assert_trees_all_close(long[:, :real], short, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(long[:, real:]), 0.0)


def test_fully_padded_sequence_is_zero_with_finite_grads():
  q, k, v = random_qkv(seed=6)
  mask = jnp.asarray(np.arange(LENGTH)[None, :] < np.array([[LENGTH], [0]]))
  kernel = jnp.asarray(np.random.default_rng(6).standard_normal((5, HEADS)), jnp.float32)
  fn = functools.partial(nystromformer_lib.nystromformer_attention, mask=mask, num_landmarks=4)

  def loss(q, k, v, w):
    out = fn(q, k, v, conv_kernel=w)
    return (out**2).sum(), out

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  grads, out = grad_fn(q, k, v, kernel)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  chex.assert_tree_all_finite(grads)
  for g in grads[:3]:
    assert float(jnp.abs(g[0]).sum()) > 0
    np.testing.assert_array_equal(np.asarray(g[1]), 0.0)


def test_depthwise_conv_matches_numpy():
  v = np.random.default_rng(7).standard_normal((1, 9, HEADS, 3))
  kernel = np.random.default_rng(8).standard_normal((3, HEADS))
  out = nystromformer_lib.depthwise_conv(jnp.asarray(v), jnp.asarray(kernel))
  padded = np.pad(v, ((0, 0), (1, 1), (0, 0), (0, 0)))
  expected = sum(kernel[i][None, None, :, None] * padded[:, i : i + 9] for i in range(3))
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_module_shape_and_finite_param_grads():
  module = build(seed=1, num_landmarks=4, conv_kernel_size=5)
  assert module.conv_kernel.value.shape == (5, HEADS)
  assert module.conv_kernel.get_metadata()["out_sharding"] == (None, "heads")
  x = jnp.asarray(np.random.default_rng(9).standard_normal((BATCH, 20, FEATURES)), jnp.float32)
  mask = jnp.asarray(np.arange(20)[None, :] < np.array([[20], [13]]))

  @nnx.jit
  def grads(module, x, mask):
    def loss(m):
      y = m(x, mask=mask)
      return (y**2).mean(), y

    return nnx.grad(loss, has_aux=True)(module)

  g, y = grads(module, x, mask)
  chex.assert_shape(y, x.shape)
  chex.assert_tree_all_finite(y)
  chex.assert_tree_all_finite(nnx.to_pure_dict(g))
  assert np.abs(np.asarray(g.query.kernel.value)).sum() > 0
  assert np.abs(np.asarray(g.conv_kernel.value)).sum() > 0


_train_temp_bytes = reference.train_temp_bytes


def test_compiled_memory_is_subquadratic():
  nys = functools.partial(nystromformer_lib.nystromformer_attention, num_landmarks=64)
  mem, mem_2x = (_train_temp_bytes(nys, n) for n in (2048, 4096))
  soft_2x = _train_temp_bytes(softmax_lib.softmax_attention, 4096)
  assert mem_2x < 2.6 * mem
  assert mem_2x < 0.1 * soft_2x


def test_bad_input_raises_config_error():
  q, k, v = random_qkv(seed=10)
  with pytest.raises(ConfigError, match="nystromformer.*causal"):
    nystromformer_lib.nystromformer_attention(q, k, v, causal=True)
  with pytest.raises(ConfigError, match="nystromformer.*causal"):
    build(causal=True)
  for param, values in [
    ("num_landmarks", (0, -2, 2.5)),
    ("pinv_iterations", (-1, 1.5)),
    ("conv_kernel_size", (-1, 3.0)),
  ]:
    for value in values:
      with pytest.raises(ConfigError, match=f"nystromformer.*{param}"):
        build(**{param: value})
  with pytest.raises(ConfigError, match="nystromformer.*num_landmarks"):
    nystromformer_lib.nystromformer_attention(q, k, v, num_landmarks=0)
  with pytest.raises(ConfigError, match="nystromformer.*unknown"):
    build(landmarks=4)


def test_make_registers_nystromformer():
  assert "nystromformer" in attention.available()
  module = build()
  assert type(module) is nystromformer_lib.NystromformerAttention
  assert (module.num_landmarks, module.pinv_iterations, module.conv_kernel_size) == (64, 6, 0)
  assert module.conv_kernel is None


def test_values_and_grads_equal_the_three_factors_product():
  """The kernel (unnormalized F and B, `local.normalize`'s backward) against F A+ B V built
  from `nystrom_factors` with plain matrix products, outputs and gradients, padding included."""
  q, k, v = random_qkv(7)
  mask = random_mask(8)

  def factors_product(q, k, v):
    real = mask.astype(bool)
    f, a, b = nystromformer_lib.nystrom_factors(q, k, real, 4)
    vf = jnp.where(real[:, :, None, None], v, 0.0)
    bv = jnp.einsum("bhml,blhd->bhmd", b, vf)
    out = jnp.einsum("bhlm,bhmd->blhd", f, nystromformer_lib.iterative_pinv(a, 6) @ bv)
    return jnp.where(real[:, :, None, None], out, 0.0)

  kernel = functools.partial(
    attention.nystromformer_attention, mask=mask, num_landmarks=4, pinv_iterations=6
  )
  weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  out, ref = kernel(q, k, v), factors_product(q, k, v)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  grads = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(loss(factors_product), argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(grads[1]).sum()) > 0
