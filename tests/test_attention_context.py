"""The wider attention contract: keys and values from [context; x], an additive bias.

Parametrized over `attention.available()`: a new variant is checked here without a
line added. Sizes: x of 32 tokens after a context of 32 (64 keys), the variants'
smoke kwargs for 64 positions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.errors import ConfigError
from efficient_transformers.training import config_lib
from tests.attention_reference import dense_attention

# Independent tests: the xdist workers share them one by one (tests/conftest.py).
pytestmark = pytest.mark.spread

CONTEXT, LENGTH, FEATURES = 32, 32, 16


def make(name, *, causal, position=None):
  kwargs = dict(config_lib.attention_defaults(name, smoke=True, sequence_length=CONTEXT + LENGTH))
  return attention.make(
    name,
    in_features=FEATURES,
    num_heads=2,
    head_dim=8,
    causal=causal,
    position=position,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, LENGTH, FEATURES)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, CONTEXT, FEATURES)), jnp.float32)
  # Row 1: the first 5 memory slots empty, the last 7 tokens padding.
  context_mask = jnp.asarray(np.arange(CONTEXT)[None] >= np.array([[0], [5]]))
  mask = jnp.asarray(np.arange(LENGTH)[None] < np.array([[LENGTH], [LENGTH - 7]]))
  return x, context, context_mask, mask


def call(module, x, context, context_mask, mask):
  """The module, jitted, from its state as it is now (random hashes or features repeat)."""
  graphdef, state = nnx.split(module)
  return _jitted(graphdef)(state, x, context, context_mask, mask)


@functools.cache
def _jitted(graphdef):
  @jax.jit
  def run(state, x, context, context_mask, mask):
    return nnx.merge(graphdef, state)(x, mask=mask, context=context, context_mask=context_mask)

  return run


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["softmax", "dot_product", "memory_efficient"])
def test_exact_variants_equal_dense_attention_over_the_context(name, causal):
  """x's queries against [context; x] keys, query i at key position CONTEXT + i."""
  module = make(name, causal=causal)
  x, context, context_mask, mask = inputs()
  h = jnp.concatenate([context, x], axis=1)
  kv_mask = jnp.concatenate([context_mask, mask], axis=1)
  pattern = np.arange(CONTEXT + LENGTH)[None, :] <= CONTEXT + np.arange(LENGTH)[:, None]
  ref = dense_attention(
    module.query(x),
    module.key(h),
    module.value(h),
    mask=kv_mask,
    pattern=pattern if causal else None,
  )
  ref = module.out(jnp.where(mask[:, :, None, None], ref, 0.0))
  np.testing.assert_allclose(call(module, x, context, context_mask, mask), ref, atol=2e-5)


@pytest.mark.parametrize("name", attention.available())
def test_every_variant_takes_a_context_and_sees_it(name):
  causal = name in attention.available(causal=True)
  module = make(name, causal=causal)
  x, context, context_mask, mask = inputs()
  out = call(module, x, context, context_mask, mask)
  assert out.shape == x.shape and bool(jnp.isfinite(out).all())
  # The context is read: other context values move the real outputs ...
  other = call(module, x, context + 1.0, context_mask, mask)
  assert float(jnp.abs(other - out)[mask].max()) > 1e-4
  # ... except in its masked (empty) slots.
  hidden = context.at[1, :5].set(7.0)
  np.testing.assert_allclose(call(module, x, hidden, context_mask, mask), out, atol=1e-5)
  if causal:
    # And a later token never moves an earlier output.
    later = x.at[:, 20:].set(3.0)
    np.testing.assert_allclose(
      call(module, later, context, context_mask, mask)[:, :20], out[:, :20], atol=1e-5
    )


@pytest.mark.parametrize("name", [n for n in attention.available(causal=True)])
def test_a_context_equals_self_attention_over_the_concatenation(name):
  """The defining property: x's outputs are those of the variant over [context; x]
  (for the exact variants, two different code paths; RoPE shows the positions agree)."""
  position = None if name == "synthesizer" else "rope"
  module = make(name, causal=True, position=position)
  x, context, context_mask, mask = inputs(1)
  h = jnp.concatenate([context, x], axis=1)
  kv_mask = jnp.concatenate([context_mask, mask], axis=1)
  full = nnx.clone(module)(h, mask=kv_mask)[:, CONTEXT:]
  full = jnp.where(mask[:, :, None], full, module.out.bias[...])
  got = call(module, x, context, context_mask, mask)
  got = jnp.where(mask[:, :, None], got, module.out.bias[...])
  np.testing.assert_allclose(got, full, atol=2e-5)


@pytest.mark.parametrize("name", ["softmax", "dot_product"])
def test_an_additive_bias_equals_dense_attention_with_it(name):
  module = make(name, causal=False)
  x, _, _, mask = inputs(2)
  bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, LENGTH, LENGTH)), jnp.float32)
  q, k, v = module.query(x), module.key(x), module.value(x)
  ref = module.out(dense_attention(q, k, v, mask=mask, bias=bias))
  np.testing.assert_allclose(module(x, mask=mask, bias=bias), ref, atol=2e-5)


def test_an_unsupported_option_is_refused_naming_the_variant_and_the_option():
  x, _, _, mask = inputs()
  with pytest.raises(ConfigError, match=r"'performer' does not take an additive bias.*softmax"):
    make("performer", causal=True)(x, mask=mask, bias=jnp.zeros((1, 1, LENGTH, LENGTH)))
  with pytest.raises(ConfigError, match=r"'linear' does not take position='relative'"):
    make("linear", causal=True, position="relative")
  with pytest.raises(ConfigError, match="position='relative' .* is causal only"):
    make("softmax", causal=False, position="relative")


def test_the_pure_functions_keep_their_signature():
  """The contract's options are keyword-only additions: old calls run unchanged."""
  from efficient_transformers.attention.softmax import softmax_attention

  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 8, 2, 4)), jnp.float32) for _ in range(3))
  np.testing.assert_allclose(
    softmax_attention(q, k, v, causal=True), dense_attention(q, k, v, causal=True), atol=1e-6
  )
  # q_offset = kv_length - q_length is the usual end alignment of a memory.
  np.testing.assert_allclose(
    softmax_attention(q[:, 5:], k, v, causal=True, q_offset=5),
    dense_attention(q, k, v, causal=True)[:, 5:],
    atol=1e-6,
  )
