"""Linformer: shapes, padding, parameter layout, exactness limit, memory, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import linformer as linformer_lib
from efficient_transformers.attention import softmax as softmax_lib
from efficient_transformers.errors import ConfigError

BATCH, LENGTH, HEADS, HEAD_DIM, FEATURES = 2, 24, 2, 8, 16


def random_qkv(seed, length=LENGTH):
  rng = np.random.default_rng(seed)
  shape = (BATCH, length, HEADS, HEAD_DIM)
  return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))


def random_mask(seed, length=LENGTH):
  mask = np.random.default_rng(seed).random((BATCH, length)) < 0.6
  mask[0, 3] = True
  mask[1, 0] = False
  return jnp.asarray(mask)


def random_projection(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) / 4, jnp.float32)


linformer = jax.jit(linformer_lib.linformer_attention)
softmax = jax.jit(softmax_lib.softmax_attention)


def build(seed=0, **kwargs):
  kwargs = dict(max_length=32, k=8) | kwargs
  return attention.make(
    "linformer",
    in_features=FEATURES,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    rngs=nnx.Rngs(seed),
    **kwargs,
  )


@nnx.jit
def apply(module, x, mask):
  return module(x, mask=mask)


@pytest.mark.parametrize("share_heads", [True, False])
def test_identity_projection_is_exact_softmax_with_padding(share_heads):
  q, k, v = random_qkv(seed=1)
  mask = random_mask(seed=1)
  eye = jnp.eye(LENGTH)
  if not share_heads:
    eye = jnp.broadcast_to(eye, (HEADS, LENGTH, LENGTH))
  out = linformer(q, k, v, eye, eye, mask=mask)
  ref = softmax(q, k, v, mask=mask)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  # Without a mask too (and share_kv: F = E).
  chex.assert_trees_all_close(linformer(q, k, v, eye), softmax(q, k, v), atol=1e-5, rtol=1e-5)


def test_module_with_identity_projections_equals_softmax_module():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((BATCH, LENGTH, FEATURES)), jnp.float32)
  mask = random_mask(seed=2)
  source = attention.make(
    "softmax", in_features=FEATURES, num_heads=HEADS, head_dim=HEAD_DIM, rngs=nnx.Rngs(0)
  )
  module = build(seed=1, max_length=LENGTH, k=LENGTH, share_kv=True)
  nnx.update(module, nnx.state(source))
  expected = apply(source, x, mask)
  # Learned (random) projections: not the exact result, so the check below is not vacuous.
  assert not np.allclose(apply(module, x, mask), expected, atol=1e-3)
  module.key_projection.value = jnp.eye(LENGTH)
  chex.assert_trees_all_close(apply(module, x, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("share_kv, share_heads", [(True, True), (False, False)])
def test_padded_keys_excluded_and_padded_queries_zero(share_kv, share_heads):
  shape = (32, 8) if share_heads else (HEADS, 32, 8)
  e = random_projection(3, shape)
  f = None if share_kv else random_projection(4, shape)
  q, k, v = random_qkv(seed=5)
  mask = random_mask(seed=5)
  out = linformer(q, k, v, e, f, mask=mask)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite(out)
  # Junk under the padding (keys and values) does not reach real outputs.
  _, k2, v2 = random_qkv(seed=6)
  pad = ~mask[:, :, None, None]
  out2 = linformer(q, jnp.where(pad, k2, k), jnp.where(pad, v2, v), e, f, mask=mask)
  chex.assert_trees_all_close(out2, out, atol=1e-6, rtol=1e-6)
  padded = ~np.asarray(mask)
  np.testing.assert_array_equal(np.asarray(out)[padded], 0.0)
  assert np.all(np.abs(np.asarray(out)[~padded]).sum(axis=(1, 2)) > 0)
  # Appending padding leaves real outputs unchanged.
  real = LENGTH - 7
  ones = jnp.ones((BATCH, real), bool)
  short = linformer(q[:, :real], k[:, :real], v[:, :real], e, f, mask=ones)
  tail = jnp.asarray(np.arange(LENGTH)[None, :].repeat(BATCH, 0) < real)
  junk = ~tail[:, :, None, None]
  long = linformer(q, jnp.where(junk, k2, k), jnp.where(junk, v2, v), e, f, mask=tail)
  chex.assert_trees_all_close(long[:, :real], short, atol=1e-5, rtol=1e-5)


def test_fully_padded_sequence_is_zero_with_finite_grads():
  e = random_projection(7, (32, 8))
  q, k, v = random_qkv(seed=7)
  mask = jnp.asarray(np.arange(LENGTH)[None, :] < np.array([[LENGTH], [0]]))

  def loss(q, k, v, e):
    out = linformer_lib.linformer_attention(q, k, v, e, mask=mask)
    return (out**2).sum(), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, e)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads[3]).sum()) > 0


@pytest.mark.parametrize(
  "kwargs, shape",
  [
    (dict(), (32, 8)),
    (dict(share_heads=False), (HEADS, 32, 8)),
    (dict(share_kv=True), (32, 8)),
    (dict(share_kv=True, share_heads=False), (HEADS, 32, 8)),
  ],
)
def test_parameter_shapes_and_axes(kwargs, shape):
  module = build(**kwargs)
  assert module.key_projection.value.shape == shape
  expected_axes = (None, None) if len(shape) == 2 else ("heads", None, None)
  assert module.key_projection.get_metadata()["out_sharding"] == expected_axes
  if kwargs.get("share_kv"):
    assert module.value_projection is None
  else:
    assert module.value_projection.value.shape == shape
    assert not np.allclose(module.value_projection.value, module.key_projection.value)


def test_module_shape_and_finite_param_grads():
  module = build(seed=3, share_heads=False)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((BATCH, 20, FEATURES)), jnp.float32)
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
  for name in ("key_projection", "value_projection"):
    g_proj = np.asarray(getattr(g, name).value)
    assert np.abs(g_proj).sum() > 0
    # Rows past the input length (and of the padding) get no gradient.
    np.testing.assert_array_equal(g_proj[:, 20:], 0.0)


def _train_temp_bytes(fn, length, extra_args=()):
  """Compiled temp memory of grad(sum(attention)) w.r.t. q, k, v; nothing runs."""
  x = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  loss = lambda q, k, v, m, *extra: fn(q, k, v, *extra, mask=m).sum()
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  compiled = grad.lower(x, x, x, mask, *extra_args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_memory_is_subquadratic():
  e = jax.ShapeDtypeStruct((4096, 16), jnp.float32)
  lin = functools.partial(_train_temp_bytes, linformer_lib.linformer_attention, extra_args=(e,))
  mem, mem_2x = lin(2048), lin(4096)
  soft_2x = _train_temp_bytes(softmax_lib.softmax_attention, 4096)
  assert mem_2x < 2.6 * mem
  assert mem_2x < 0.1 * soft_2x


def test_bad_input_raises_config_error():
  q, k, v = random_qkv(seed=9)
  with pytest.raises(ConfigError, match="linformer.*max_length"):
    linformer_lib.linformer_attention(q, k, v, jnp.ones((LENGTH - 1, 4)))
  with pytest.raises(ConfigError, match="linformer.*max_length"):
    apply(build(max_length=LENGTH - 1), jnp.ones((BATCH, LENGTH, FEATURES)), None)
  with pytest.raises(ConfigError, match="linformer.*causal"):
    linformer_lib.linformer_attention(q, k, v, jnp.ones((LENGTH, 4)), causal=True)
  with pytest.raises(ConfigError, match="linformer.*causal"):
    build(causal=True)
  for param in ("k", "max_length"):
    for value in (0, -3, 2.5):
      with pytest.raises(ConfigError, match=f"linformer.*{param}"):
        build(**{param: value})
  with pytest.raises(ConfigError, match="linformer.*unknown"):
    build(low_rank=4)


def test_make_registers_linformer():
  assert "linformer" in attention.available()
  module = build()
  assert type(module) is linformer_lib.LinformerAttention
  assert module.k == 8 and module.max_length == 32
  defaults = attention.make(
    "linformer", in_features=FEATURES, num_heads=HEADS, head_dim=HEAD_DIM, rngs=nnx.Rngs(0)
  )
  assert defaults.key_projection.value.shape == (4096, 16)
