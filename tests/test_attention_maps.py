"""The attention map of every variant (`attention.maps`): its product with v is the variant's
output, rows are normalised over real keys, and masked keys get no weight.

The shared checks run on each module's own map (`MultiHeadAttention.attention_weights`):
out(map @ value(x)) must equal the module's output on x, with padding and, where the variant
can be causal, with causal=True.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import maps
from efficient_transformers.errors import ConfigError

BATCH, LENGTH, FEATURES, HEADS, HEAD_DIM = 2, 16, 16, 2, 8
MASK = jnp.arange(LENGTH)[None, :] < jnp.array([[LENGTH], [LENGTH - 5]])


def module(name, *, causal=False, **kwargs):
  return attention.make(
    name,
    in_features=FEATURES,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    causal=causal,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


def x_input(seed=0):
  return jax.random.normal(jax.random.key(seed), (BATCH, LENGTH, FEATURES))


def check_map_reproduces_output(m, x, mask, *, atol):
  """The map of m on x: out(map @ v) == m(x) on real rows; returns the map."""
  weights = m.attention_weights(x, mask=mask)
  assert weights.shape == (BATCH, HEADS, LENGTH, LENGTH)
  y_map = m.out(maps.apply_weights(weights, m.value(x)).astype(x.dtype))
  y = m(x, mask=mask)
  real = np.ones((BATCH, LENGTH), bool) if mask is None else np.asarray(mask)
  np.testing.assert_allclose(np.asarray(y_map)[real], np.asarray(y)[real], atol=atol)
  return np.asarray(weights)


def check_rows_and_masked_keys(weights, mask, *, causal):
  real = np.asarray(mask)
  for b in range(BATCH):
    rows = weights[b][:, real[b]]  # real query rows
    assert np.all(rows[..., ~real[b]] == 0), "weight on a padded key"
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
    if causal:
      assert np.all(np.triu(weights[b], k=1) == 0), "weight on a later key"


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_map(causal):
  m = module("softmax", causal=causal)
  x = x_input()
  weights = check_map_reproduces_output(m, x, MASK, atol=1e-5)
  check_rows_and_masked_keys(weights, MASK, causal=causal)
  # Against an independent computation: numpy softmax of the scaled logits.
  q, k = np.asarray(m.query(x), np.float64), np.asarray(m.key(x), np.float64)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
  logits = np.where(np.asarray(MASK)[:, None, None, :], logits, -np.inf)
  if causal:
    logits = np.where(np.tril(np.ones((LENGTH, LENGTH), bool)), logits, -np.inf)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  real = np.asarray(MASK)
  for b in range(BATCH):
    np.testing.assert_allclose(weights[b][:, real[b]], expected[b][:, real[b]], atol=1e-5)


def test_a_map_above_the_length_limit_is_refused():
  m = module("softmax")
  with pytest.raises(ConfigError, match=r"\[16, 16\].*max_length=8") as info:
    m.attention_weights(x_input(), max_length=8)
  assert info.value.argument == "max_length"
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ConfigError, match="no attention map function; those that do: .*softmax"):
    maps.attention_weights("nope", q, q)


def test_every_registered_attention_has_a_map():
  assert set(maps.available()) == set(attention.available())
