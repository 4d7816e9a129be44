"""Synthesizer attention: exactness limits, padding, causality, training, parameter growth.

The Synthesizer builds [L, L] logits by definition, so instead of a memory
growth test the factorized forms are checked to have parameter counts that
grow sublinearly relative to the plain forms. References: the shared dense
oracle (tests/attention_reference.py) for the dot-product limit of the
mixture, and a small softmax over given logits written here from the
definition for the random forms.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.attention import registry
from efficient_transformers.attention import synthesizer as synthesizer_lib
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
)

LENGTH, MAX_LENGTH, FEATURES = 29, 40, 16  # max_length > length: the tables are sliced.
FORMS = synthesizer_lib.FORMS
_RNG = np.random.default_rng(0)
DENSE_KERNEL = jnp.asarray(_RNG.standard_normal((HEADS, HEAD_DIM, MAX_LENGTH)), jnp.float32)
DENSE_BIAS = jnp.asarray(_RNG.standard_normal((HEADS, MAX_LENGTH)), jnp.float32)
# (mask, causal): each distinct (mask is None, causal) costs a compilation, so few of them.
MIX_CASES = [("right_padding", False), ("random", True)]
RANDOM_CASES = [("none", False), ("random", True)]


def softmax_oracle(logits, v, *, mask, causal):
  """softmax over the allowed keys of `logits` [1 or batch, heads, L, L], times v [b, L, h, d].

  Rows with no allowed key and padded query rows are 0. Written from the
  definition, independent of the library's masking helpers.
  """
  length = v.shape[1]
  allowed = np.ones((1, 1, length, length), bool)
  if causal:
    allowed &= np.tril(np.ones((length, length), bool))
  allowed = jnp.asarray(allowed)
  if mask is not None:
    allowed = allowed & mask[:, None, None, :]
  logits = jnp.broadcast_to(logits, (v.shape[0], *logits.shape[1:]))
  row_max = jnp.where(allowed, logits, -jnp.inf).max(axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  e = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits - row_max, 0.0)), 0.0)
  denom = e.sum(axis=-1, keepdims=True)
  out = jnp.einsum("bhqk,bkhd->bqhd", e / jnp.where(denom > 0, denom, 1.0), v)
  if mask is not None:
    out = jnp.where(mask[:, :, None, None], out, 0.0)
  return out


def mixed_dense_with_dot_only(q, k, v, *, mask, causal):
  """The dense synthesizer mixed with a1 = 0, a2 = 1: exact softmax attention."""
  logits = synthesizer_lib.dense_synthesizer_logits(q, DENSE_KERNEL, DENSE_BIAS)
  mix = (jnp.zeros((HEADS,)), jnp.ones((HEADS,)))
  return synthesizer_lib.synthesizer_attention(
    logits, v, q=q, k=k, mask=mask, causal=causal, mix_weights=mix
  )


def random_form(table, v, *, mask, causal):
  logits = synthesizer_lib.random_synthesizer_logits(table, v.shape[1])
  return synthesizer_lib.synthesizer_attention(logits, v, mask=mask, causal=causal)


def random_oracle(table, v, *, mask, causal):
  length = v.shape[1]
  return softmax_oracle(table[None, :, :length, :length], v, mask=mask, causal=causal)


def factorized_random_form(factors, v, *, mask, causal):
  logits = synthesizer_lib.factorized_random_synthesizer_logits(*factors, v.shape[1])
  return synthesizer_lib.synthesizer_attention(logits, v, mask=mask, causal=causal)


def random_form_of_product(factors, v, *, mask, causal):
  return random_form(jnp.einsum("hlr,hmr->hlm", *factors), v, mask=mask, causal=causal)


@functools.cache
def _params_runner(fn, causal):
  """Jitted (params, v, mask) -> (output, grads w.r.t. params and v of a weighted sum)."""

  @jax.jit
  def run(params, v, mask):
    out, vjp = jax.vjp(lambda p, v: fn(p, v, mask=mask, causal=causal), params, v)
    return out, vjp(cotangent(out))

  return run


@pytest.mark.parametrize("mask_kind, causal", MIX_CASES)
def test_mixture_with_only_dot_product_is_exact_softmax(mask_kind, causal):
  q, k, v = random_qkv(1, LENGTH)
  mask = make_mask(mask_kind, LENGTH, seed=1)
  out, grads = output_and_grads_fn(mixed_dense_with_dot_only, causal)(q, k, v, mask)
  ref, ref_grads = output_and_grads_fn(dense_attention, causal)(q, k, v, mask)
  chex.assert_shape(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask_kind, causal", RANDOM_CASES)
def test_random_form_is_softmax_of_the_given_logits(mask_kind, causal):
  table = jnp.asarray(np.random.default_rng(2).standard_normal((HEADS, MAX_LENGTH, MAX_LENGTH)))
  table = table.astype(jnp.float32)
  v = random_qkv(2, LENGTH)[2]
  mask = make_mask(mask_kind, LENGTH, seed=2)
  out, grads = _params_runner(random_form, causal)(table, v, mask)
  ref, ref_grads = _params_runner(random_oracle, causal)(table, v, mask)
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
  # The table rows/columns beyond the length get no gradient: it is sliced, not resized.
  np.testing.assert_array_equal(np.asarray(grads[0][:, LENGTH:]), 0.0)
  if mask is not None:
    np.testing.assert_array_equal(np.asarray(out)[~np.asarray(mask)], 0.0)


def test_factorized_random_is_random_with_the_product():
  mask_kind, causal = "right_padding", False
  rng = np.random.default_rng(3)
  factors = tuple(
    jnp.asarray(rng.standard_normal((HEADS, MAX_LENGTH, 3)), jnp.float32) for _ in range(2)
  )
  v = random_qkv(3, LENGTH)[2]
  mask = make_mask(mask_kind, LENGTH, seed=3)
  out, grads = _params_runner(factorized_random_form, causal)(factors, v, mask)
  ref, ref_grads = _params_runner(random_form_of_product, causal)(factors, v, mask)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(grads[0][0]).max()) > 0  # R1 gets a gradient


def test_factorized_dense_and_dense_logits_by_hand():
  rng = np.random.default_rng(4)
  heads, head_dim, a, b = 2, 3, 2, 3  # max_length 5 with factor 2: b = ceil(5 / 2) = 3
  q = rng.standard_normal((1, 5, heads, head_dim)).astype(np.float32)
  ka, kb = (rng.standard_normal((heads, head_dim, n)).astype(np.float32) for n in (a, b))
  ba, bb = (rng.standard_normal((heads, n)).astype(np.float32) for n in (a, b))
  factorized = jax.jit(synthesizer_lib.factorized_dense_synthesizer_logits)
  for length in (5, 3):  # 3 keys use only B[0], B[1]
    got = factorized(q[:, :length], ka, ba, kb, bb)
    chex.assert_shape(got, (1, heads, length, length))
    for h in range(heads):
      for i in range(length):
        hidden = np.maximum(q[0, i, h], 0.0)
        fa, fb = hidden @ ka[h] + ba[h], hidden @ kb[h] + bb[h]
        want = [fa[j % a] * fb[j // a] for j in range(length)]
        np.testing.assert_allclose(np.asarray(got[0, h, i]), want, rtol=1e-5, atol=1e-6)
  # Dense: relu(q) @ W2[h] + b2[h], the first L columns.
  w2 = rng.standard_normal((heads, head_dim, 7)).astype(np.float32)
  b2 = rng.standard_normal((heads, 7)).astype(np.float32)
  got = jax.jit(synthesizer_lib.dense_synthesizer_logits)(q, w2, b2)
  want = np.einsum("blhd,hdk->bhlk", np.maximum(q, 0.0), w2[..., :5]) + b2[None, :, None, :5]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  module = nnx.eval_shape(lambda: _build(synthesizer="factorized_dense", max_length=5, factor=2))
  assert module.synth_kernel_a.shape == (HEADS, HEAD_DIM, 2)
  assert module.synth_kernel_b.shape == (HEADS, HEAD_DIM, 3)


def test_fully_masked_sequence_is_zero_with_finite_grads():
  q, k, v = random_qkv(5, LENGTH)
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1] = False
  out, grads = output_and_grads_fn(mixed_dense_with_dot_only, True)(q, k, v, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  chex.assert_tree_all_finite(grads)


def _build(causal=False, **kwargs):
  return registry.make(
    "synthesizer",
    in_features=FEATURES,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


@functools.cache
def _module(form, mix, causal):
  """A built module shared by the tests (building one costs seconds of eager dispatch)."""
  return _build(causal=causal, synthesizer=form, max_length=MAX_LENGTH, mix_dot_product=mix)


_SYNTH_PARAMS = {
  "dense": ("synth_kernel", "synth_bias"),
  "random": ("random_logits",),
  "factorized_dense": ("synth_kernel_a", "synth_bias_a", "synth_kernel_b", "synth_bias_b"),
  "factorized_random": ("random_factor_1", "random_factor_2"),
}


@nnx.jit
def _module_outputs_and_grads(module, x, mask):
  """Module outputs for the rows of x, and param grads of a weighted sum of them (one pass)."""

  def loss(m):
    y = m(x, mask=mask)
    return (y * x).sum(), y

  grads, y = nnx.grad(loss, has_aux=True)(module)
  return y, grads


# (form, mix_dot_product, causal): every form causal, each with or without the mixture, and
# one non-causal module; few, because each costs a build and a compilation.
MODULE_CASES = [
  ("dense", True, True),
  ("random", False, True),
  ("factorized_dense", True, True),
  ("factorized_random", False, True),
  ("dense", False, False),
]


@pytest.mark.parametrize("form, mix, causal", MODULE_CASES)
def test_module_padding_causality_and_training(form, mix, causal):
  module = _module(form, mix, causal)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, FEATURES)), jnp.float32)
  mask = make_mask("random", LENGTH, seed=6)  # holes anywhere, padded first key
  # replace_padded / replace_future act on [batch, length, ...] arrays: x as a 1-head q.
  x_padded = replace_padded((x[:, :, None],) * 3, mask, seed=7)[0][:, :, 0]
  t = 13
  x_future = replace_future((x[:, :, None],) * 3, t, seed=8)[0][:, :, 0]
  # The three inputs as one batch (one compiled pass): x, padding replaced, future replaced.
  y, grads = _module_outputs_and_grads(
    module, jnp.concatenate([x, x_padded, x_future]), jnp.concatenate([mask] * 3)
  )
  chex.assert_shape(y, (3 * BATCH, LENGTH, FEATURES))
  chex.assert_tree_all_finite((y, nnx.state(grads)))
  y, y_padded, y_future = np.split(np.asarray(y), 3)
  real = np.asarray(mask)
  np.testing.assert_allclose(y_padded[real], y[real], atol=1e-5)
  # Padded query rows are zero before the output projection: only its bias remains.
  np.testing.assert_allclose(y[~real], np.broadcast_to(module.out.bias[...], y[~real].shape))
  if causal:
    np.testing.assert_allclose(y_future[:, :t], y[:, :t], atol=1e-5)
  else:
    assert not np.allclose(y_future[:, :t], y[:, :t], atol=1e-3)  # the check above can fail
  for name in _SYNTH_PARAMS[form] + (("mix_synthesized", "mix_dot") if mix else ()):
    assert float(jnp.abs(getattr(grads, name)[...]).max()) > 0, name
  # The key projection is used only by the mixture (kept for a uniform parameter tree).
  key_grad = float(jnp.abs(grads.key.kernel[...]).max())
  assert key_grad > 0 if mix else key_grad == 0


@pytest.mark.parametrize("form", ["random", "factorized_random"])
def test_random_forms_are_input_independent(form):
  module = _module(form, False, True)  # causal: the synthesized logits ignore it
  rng = np.random.default_rng(9)
  x1, x2 = (jnp.asarray(rng.standard_normal((BATCH, 17, FEATURES)), jnp.float32) for _ in "12")
  logits = module.synthesized_logits(module.query(x1))
  chex.assert_trees_all_close(logits, module.synthesized_logits(module.query(x2)), atol=0)
  # Changing x changes only v: x2's output uses the weights computed from x1.
  v2 = module.value(x2)
  y2 = module.out(synthesizer_lib.synthesizer_attention(logits, v2, causal=True))
  chex.assert_trees_all_close(module(x2), y2, atol=1e-5, rtol=1e-5)
  # The dense form, by contrast, does depend on the input.
  dense = _module("dense", False, False)
  d1, d2 = (dense.synthesized_logits(dense.query(x)) for x in (x1, x2))
  assert not np.allclose(np.asarray(d1), np.asarray(d2))


@pytest.mark.parametrize("form", ["random", "factorized_random"])
def test_fixed_random_tables_are_not_parameters(form):
  module = nnx.eval_shape(lambda: _build(synthesizer=form, trainable_random=False))
  params = nnx.state(module, nnx.Param)
  fixed = nnx.state(module, synthesizer_lib.FixedSynthesizerLogits)
  for name in _SYNTH_PARAMS[form]:
    assert name not in params and name in fixed
  trainable = nnx.eval_shape(lambda: _build(synthesizer=form))
  for name in _SYNTH_PARAMS[form]:
    assert name in nnx.state(trainable, nnx.Param)


def _synthesizer_param_count(module) -> int:
  """Parameters beyond the four projections shared by every variant."""
  state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  extra = {k: v for k, v in state.items() if k not in ("query", "key", "value", "out")}
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(extra))


def test_factorized_parameters_grow_sublinearly_vs_plain_forms():
  lengths = (64, 256, 1024)
  counts = {form: [] for form in FORMS}
  for m in lengths:
    for form in FORMS:
      # factor = sqrt(max_length) makes the factorized dense heads O(d sqrt(L)).
      kwargs = dict(factor=int(np.sqrt(m)), rank=4) if form.startswith("factorized") else {}
      build = functools.partial(_build, synthesizer=form, max_length=m, **kwargs)
      counts[form].append(_synthesizer_param_count(nnx.eval_shape(build)))
  m = np.asarray(lengths)
  np.testing.assert_array_equal(counts["dense"], HEADS * (HEAD_DIM + 1) * m)
  np.testing.assert_array_equal(counts["random"], HEADS * m**2)
  np.testing.assert_array_equal(counts["factorized_dense"], HEADS * (HEAD_DIM + 1) * 2 * np.sqrt(m))
  np.testing.assert_array_equal(counts["factorized_random"], HEADS * 2 * m * 4)
  for factorized, plain in (("factorized_dense", "dense"), ("factorized_random", "random")):
    ratio = np.asarray(counts[factorized]) / np.asarray(counts[plain])
    assert np.all(np.diff(ratio) < 0), (factorized, ratio)  # ever smaller share
    growth = counts[factorized][-1] / counts[factorized][0]
    assert growth <= 0.25 * counts[plain][-1] / counts[plain][0], (factorized, growth)


def test_unknown_form_lists_the_valid_ones():
  with pytest.raises(ConfigError, match="'synthesizer'.*synthesizer='conv'.*" + ", ".join(FORMS)):
    _build(synthesizer="conv")


@pytest.mark.parametrize(
  "param, value",
  [
    ("rank", 0),
    ("rank", -2),
    ("factor", 0),
    ("factor", 2.5),
    ("max_length", 0),
    ("trainable_random", "yes"),
  ],
)
def test_invalid_params_raise_config_error(param, value):
  with pytest.raises(ConfigError, match=f"'synthesizer'.*{param}"):
    _build(**{param: value})


@pytest.mark.parametrize("form", FORMS)
def test_length_above_max_length_raises_config_error(form):
  # Shapes only (nothing computed): the check runs while the call is traced.
  module = nnx.eval_shape(lambda: _build(synthesizer=form, max_length=16))
  x = jax.ShapeDtypeStruct((BATCH, 17, FEATURES), jnp.float32)
  x_fits = jax.ShapeDtypeStruct((BATCH, 16, FEATURES), jnp.float32)
  with pytest.raises(ConfigError, match="'synthesizer'.*length 17.*max_length=16"):
    nnx.eval_shape(lambda m, x: m(x), module, x)
  chex.assert_shape(nnx.eval_shape(lambda m, x: m(x), module, x_fits), (BATCH, 16, FEATURES))


def test_pure_logit_functions_check_max_length():
  q = jnp.zeros((1, 9, HEADS, HEAD_DIM))
  table = jnp.zeros((HEADS, 8, 8))
  calls = [
    lambda: synthesizer_lib.dense_synthesizer_logits(q, table, table[:, 0]),
    lambda: synthesizer_lib.random_synthesizer_logits(table, 9),
    lambda: synthesizer_lib.factorized_random_synthesizer_logits(table, table, 9),
    lambda: synthesizer_lib.factorized_dense_synthesizer_logits(
      q, table[..., :4], table[:, 0, :4], table[..., :2], table[:, 0, :2]
    ),
  ]
  for call in calls:
    with pytest.raises(ConfigError, match="max_length=8"):
      call()


def test_make_unknown_kwarg_names_the_variant():
  assert "synthesizer" in registry.available()
  with pytest.raises(ConfigError, match="'synthesizer'.*window"):
    _build(window=4)
