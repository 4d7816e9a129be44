"""The exact attentions (softmax, dot_product, memory_efficient) against a naive reference.

The reference below is written from the definition (explicit einsum, -inf
masking), independently of the library's masking helpers, and differentiated
by jax.grad for the gradient checks. Lengths are chosen so the
memory-efficient chunks do not divide them (internal padding is exercised).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import dot_product as dot_product_lib
from efficient_transformers.errors import ConfigError
from tests import attention_reference as reference

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 37, 2, 8
Q_CHUNK, K_CHUNK = 8, 6  # 37 = 4*8 + 5 = 6*6 + 1: several chunks, ragged last one

EXACT = {
  "softmax": attention.softmax_attention,
  "dot_product": functools.partial(attention.dot_product_attention, implementation="xla"),
  "memory_efficient": functools.partial(
    attention.memory_efficient_attention, query_chunk_size=Q_CHUNK, key_chunk_size=K_CHUNK
  ),
}


reference_attention = reference.dense_attention
_jitted_output_and_grads = reference.output_and_grads_fn


def random_qkv(seed, q_len=LENGTH, kv_len=LENGTH, dtype=jnp.float32):
  qkv = reference.random_qkv(seed, q_len, kv_len, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM)
  return tuple(x.astype(dtype) for x in qkv)


def make_mask(kind, length=LENGTH, seed=0):
  return reference.make_mask(kind, length, seed=seed)


def output_and_grads(fn, q, k, v, *, mask=None, causal=False):
  """fn's output and the gradients w.r.t. q, k, v of a weighted sum of it.

  Distinct weights per output entry keep the gradients from being trivial.
  """
  return _jitted_output_and_grads(fn, causal)(q, k, v, mask)


@functools.cache
def _jitted_output(fn, causal):
  return jax.jit(lambda q, k, v, mask: fn(q, k, v, mask=mask, causal=causal))


def output(fn, q, k, v, *, mask=None, causal=False):
  return _jitted_output(fn, causal)(q, k, v, mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "right_padding", "random"])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_values_and_grads_match_reference(name, mask_kind, causal):
  q, k, v = random_qkv(seed=1)
  mask = make_mask(mask_kind)
  out, grads = output_and_grads(EXACT[name], q, k, v, mask=mask, causal=causal)
  ref, ref_grads = output_and_grads(reference_attention, q, k, v, mask=mask, causal=causal)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_cross_attention_lengths_match_reference(name, causal):
  # q_len != kv_len; keys 0..4 masked, so with causal the first queries see
  # nothing although they are not padded queries: those rows must be 0.
  q, k, v = random_qkv(seed=2, q_len=13, kv_len=29)
  mask = jnp.asarray(np.arange(29)[None, :] >= np.array([[5], [0]]))
  out = output(EXACT[name], q, k, v, mask=mask, causal=causal)
  chex.assert_shape(out, (BATCH, 13, HEADS, HEAD_DIM))
  ref = reference_attention(q, k, v, mask=mask, causal=causal)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  if causal:
    np.testing.assert_array_equal(np.asarray(out[0, :5]), 0.0)
    assert np.all(np.abs(np.asarray(out[0, 5:])).sum(axis=(1, 2)) > 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_fully_masked_rows_are_zero_not_nan(name, causal):
  q, k, v = random_qkv(seed=3)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1] = False  # the whole second sequence is padding
  mask = jnp.asarray(mask)
  out, grads = output_and_grads(EXACT[name], q, k, v, mask=mask, causal=causal)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  assert np.all(np.abs(np.asarray(out[0])).sum(axis=(1, 2)) > 0)
  chex.assert_tree_all_finite(grads)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g[1]), 0.0)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_padded_query_rows_are_zero(name):
  q, k, v = random_qkv(seed=4)
  mask = make_mask("random", seed=4)
  out = np.asarray(output(EXACT[name], q, k, v, mask=mask))
  padded = ~np.asarray(mask)
  np.testing.assert_array_equal(out[padded], 0.0)
  assert np.all(np.abs(out[~padded]).sum(axis=(1, 2)) > 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_appending_padding_leaves_real_tokens_unchanged(name, causal):
  real = LENGTH - 9
  q, k, v = random_qkv(seed=5, q_len=real, kv_len=real)
  short = output(EXACT[name], q, k, v, mask=jnp.ones((BATCH, real), bool), causal=causal)
  extra = random_qkv(seed=6, q_len=9, kv_len=9)  # junk values under the padding
  q2, k2, v2 = (jnp.concatenate([a, b], axis=1) for a, b in zip((q, k, v), extra, strict=True))
  mask = jnp.asarray(np.arange(LENGTH)[None, :].repeat(BATCH, 0) < real)
  long = output(EXACT[name], q2, k2, v2, mask=mask, causal=causal)
  chex.assert_trees_all_close(long[:, :real], short, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(long[:, real:]), 0.0)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_bfloat16_close_to_float32_reference(name):
  q, k, v = random_qkv(seed=8)
  mask = make_mask("random", seed=8)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out, grads = output_and_grads(EXACT[name], qb, kb, vb, mask=mask, causal=True)
  ref, ref_grads = output_and_grads(reference_attention, q, k, v, mask=mask, causal=True)
  assert out.dtype == jnp.bfloat16
  chex.assert_trees_all_close(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)
  for g, r in zip(grads, ref_grads, strict=True):
    assert g.dtype == jnp.bfloat16
    chex.assert_trees_all_close(g.astype(jnp.float32), r, atol=8e-2, rtol=5e-2)


def test_memory_efficient_chunk_sizes_do_not_change_result():
  q, k, v = random_qkv(seed=9)
  mask = make_mask("random", seed=9)
  chunked = attention.memory_efficient_attention
  outs = [
    output(
      functools.partial(chunked, query_chunk_size=cq, key_chunk_size=ck),
      q,
      k,
      v,
      mask=mask,
      causal=True,
    )
    for cq, ck in [(1, 1), (5, 16), (512, 512)]
  ]
  for out in outs[1:]:
    chex.assert_trees_all_close(out, outs[0], atol=1e-5, rtol=1e-5)


def test_dot_product_auto_implementation_is_xla_on_cpu():
  q, k, _ = random_qkv(seed=10, dtype=jnp.bfloat16)
  assert jax.default_backend() == "cpu"
  assert dot_product_lib.resolve_implementation(None, q, k) == "xla"
  # Asking for cuDNN where there is none is a config error, not a crash inside XLA.
  with pytest.raises(ConfigError, match="implementation='cudnn' needs an NVIDIA GPU.*cpu"):
    dot_product_lib.resolve_implementation("cudnn", q, k)
  q, k, v = random_qkv(seed=10)
  auto = output(attention.dot_product_attention, q, k, v, causal=True)
  chex.assert_trees_all_close(auto, reference_attention(q, k, v, causal=True), atol=1e-5)


@pytest.mark.parametrize(
  "capability, dtype, head_dim, expected",
  [
    ((9, 0), jnp.bfloat16, 64, "cudnn"),
    ((8, 0), jnp.float16, 128, "cudnn"),
    ((8, 0), jnp.bfloat16, 256, "xla"),  # head_dim > 128 needs Hopper
    ((9, 0), jnp.bfloat16, 256, "cudnn"),
    ((9, 0), jnp.float32, 64, "xla"),  # cuDNN flash attention is fp16/bf16 only
    ((9, 0), jnp.bfloat16, 60, "xla"),  # not a multiple of 8
    ((7, 5), jnp.bfloat16, 64, "xla"),  # pre-Ampere
    (None, jnp.bfloat16, 64, "xla"),  # not a CUDA GPU
  ],
)
def test_dot_product_auto_selection_rules(monkeypatch, capability, dtype, head_dim, expected):
  # The GPU is simulated: only the selection logic runs, nothing is compiled.
  monkeypatch.setattr(dot_product_lib, "_gpu_compute_capability", lambda: capability)
  x = jax.ShapeDtypeStruct((BATCH, LENGTH, HEADS, head_dim), dtype)
  assert dot_product_lib.resolve_implementation(None, x, x) == expected


def _build(name, seed, causal, **kwargs):
  return attention.make(
    name,
    in_features=16,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(seed),
    **kwargs,
  )


@nnx.jit
def apply(module, x, mask):
  return module(x, mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_modules_agree_given_identical_params(causal):
  x = jnp.asarray(np.random.default_rng(11).standard_normal((BATCH, 23, 16)), jnp.float32)
  mask = make_mask("right_padding", length=23)
  source = _build("softmax", seed=0, causal=causal)
  expected = apply(source, x, mask)
  chex.assert_shape(expected, x.shape)
  variants = {
    "dot_product": dict(implementation="xla"),
    "memory_efficient": dict(query_chunk_size=4, key_chunk_size=7),
  }
  for name, kwargs in variants.items():
    module = _build(name, seed=1, causal=causal, **kwargs)
    assert type(module) is attention.get_class(name)
    # Different seeds first: the comparison below is not vacuous.
    assert not np.allclose(apply(module, x, mask), expected, atol=1e-3)
    nnx.update(module, nnx.state(source))
    chex.assert_trees_all_close(apply(module, x, mask), expected, atol=1e-5, rtol=1e-5)


def test_make_unknown_name_lists_valid_names():
  with pytest.raises(ConfigError) as info:
    _build("flash", seed=0, causal=False)
  for name in ("dot_product", "memory_efficient", "softmax"):
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["dot_product", "memory_efficient"])
def test_make_unknown_kwarg_names_the_variant(name):
  with pytest.raises(ConfigError, match=f"'{name}'.*chunk_sizes"):
    _build(name, seed=0, causal=False, chunk_sizes=4)


def test_invalid_implementation_raises():
  with pytest.raises(ConfigError, match="dot_product.*implementation"):
    _build("dot_product", seed=0, causal=False, implementation="flash")
  q, k, v = random_qkv(seed=12)
  with pytest.raises(ConfigError, match="dot_product.*implementation"):
    attention.dot_product_attention(q, k, v, implementation="pallas")


@pytest.mark.parametrize("param", ["query_chunk_size", "key_chunk_size"])
@pytest.mark.parametrize("value", [0, -4, 2.5])
def test_invalid_chunk_size_raises(param, value):
  with pytest.raises(ConfigError, match=f"memory_efficient.*{param}"):
    _build("memory_efficient", seed=0, causal=False, **{param: value})
  q, k, v = random_qkv(seed=13)
  with pytest.raises(ConfigError, match=f"memory_efficient.*{param}"):
    attention.memory_efficient_attention(q, k, v, **{param: value})


_train_temp_bytes = reference.train_temp_bytes


def test_memory_efficient_compiled_memory_is_linear():
  chunked = functools.partial(
    attention.memory_efficient_attention, query_chunk_size=128, key_chunk_size=128
  )
  soft, soft_2x = (_train_temp_bytes(attention.softmax_attention, n) for n in (2048, 4096))
  mem, mem_2x = (_train_temp_bytes(chunked, n) for n in (2048, 4096))
  # The measurement does see quadratic growth where it exists...
  assert soft_2x > 3 * soft
  # ...and the chunked form is far smaller and at most linear in L.
  assert mem < 0.05 * soft
  assert mem_2x < 2.5 * mem
