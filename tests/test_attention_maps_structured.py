"""The maps of the exact kernels (dot_product, memory_efficient) and the structured ones
(local, sparse, Longformer, BigBird): out(map @ v) is the module's output, rows are
normalised over real keys, and a structured map is nonzero exactly on its own pattern.

Longformer's global rows use their own projections (`value_global`), so its map is applied
with the module's `apply_weights` (value_global(x) on the global rows, value(x) elsewhere);
with the global projections tied to the ordinary ones it is a plain map over value(x).
"""

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import maps
from tests.test_attention_maps import (
  BATCH,
  LENGTH,
  MASK,
  check_map_reproduces_output,
  check_rows_and_masked_keys,
  module,
  x_input,
)

# case: (attention name, kwargs, atol of out(map @ v) against the module), at LENGTH = 16.
CASES = {
  "dot_product": ("dot_product", {}, 1e-6),
  "memory_efficient": ("memory_efficient", dict(query_chunk_size=4, key_chunk_size=8), 1e-6),
  "local": ("local", dict(block_size=4), 1e-6),
  "sparse_fixed": ("sparse", dict(pattern="fixed", block_size=4, num_summary=2), 1e-6),
  "sparse_strided": ("sparse", dict(pattern="strided", block_size=4), 1e-6),
  "longformer": ("longformer", dict(window=2, global_positions=(0, 9)), 1e-6),
  "bigbird": ("bigbird", dict(block_size=2, num_random_blocks=1), 1e-6),
}
STRUCTURED = ["local", "sparse_fixed", "sparse_strided", "longformer", "bigbird"]


def cases(names):
  return [
    pytest.param(case, causal, id=f"{case}-{'causal' if causal else 'bidirectional'}")
    for case in names
    for causal in (False, True)
    if not causal or attention.get_class(CASES[case][0]).supports_causal
  ]


def build(case, causal=False, **extra):
  name, kwargs, _ = CASES[case]
  return module(name, causal=causal, **kwargs, **extra)


def check_reproduces(m, x, mask, *, atol):
  """check_map_reproduces_output, with Longformer's map applied by its `apply_weights`."""
  if not isinstance(m, attention.longformer.LongformerAttention):
    return check_map_reproduces_output(m, x, mask, atol=atol)
  weights = m.attention_weights(x, mask=mask)
  y_map = m.out(m.apply_weights(weights, x).astype(x.dtype))
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(y_map)[real], np.asarray(m(x, mask=mask))[real], atol=atol)
  return np.asarray(weights)


def expected_support(m, mask):
  """[batch, heads, L, L]: the module's pattern on real query rows and real keys."""
  real = np.asarray(mask)
  if isinstance(m, attention.bigbird.BigBirdAttention):  # The layout follows the real length.
    patterns = [m.pattern(LENGTH, real_length=int(row.sum())) for row in real]
  else:
    patterns = [np.broadcast_to(m.pattern(LENGTH), (m.num_heads, LENGTH, LENGTH))] * BATCH
  return np.stack(patterns) & real[:, None, :, None] & real[:, None, None, :]


@pytest.mark.parametrize("case, causal", cases(CASES))
def test_map_reproduces_output_and_rows_are_normalised(case, causal):
  m = build(case, causal)
  weights = check_reproduces(m, x_input(), MASK, atol=CASES[case][2])
  check_rows_and_masked_keys(weights, MASK, causal=causal)


@pytest.mark.parametrize("case, causal", cases(STRUCTURED))
def test_structured_map_is_nonzero_exactly_on_its_pattern(case, causal):
  m = build(case, causal)
  weights = m.attention_weights(x_input(), mask=MASK)
  expected = expected_support(m, MASK)
  assert 0.2 < expected.mean() < 0.8  # A real pattern at these settings, neither full nor empty.
  np.testing.assert_array_equal(np.asarray(weights) > 0, expected)


@pytest.mark.parametrize("case", STRUCTURED)
def test_structured_map_traces_under_jit(case):
  # As inside maps.capture in a jitted step: parameters (BigBird's layout seed) and the
  # mask are traced.
  m = build(case)
  graphdef, state = nnx.split(m)

  @jax.jit
  def weights_of(state, x, mask):
    return nnx.merge(graphdef, state).attention_weights(x, mask=mask)

  x = x_input()
  np.testing.assert_allclose(
    weights_of(state, x, MASK), m.attention_weights(x, mask=MASK), atol=1e-6
  )


def test_longformer_global_rows_weigh_the_global_values():
  m = build("longformer")
  x = x_input()
  weights = m.attention_weights(x, mask=MASK)
  plain = np.asarray(m.out(maps.apply_weights(weights, m.value(x))))
  y = np.asarray(m(x, mask=MASK))
  rows = np.asarray(m.global_positions)
  assert not np.allclose(plain[:, rows], y[:, rows], atol=1e-3)  # value(x) is not theirs.
  others = np.array(MASK)
  others[:, rows] = False  # The other real rows: their weights are over value(x).
  np.testing.assert_allclose(plain[others], y[others], atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_longformer_with_tied_global_projections_is_a_plain_map_over_values(causal):
  m = build("longformer", causal)
  for tied, own in [(m.query_global, m.query), (m.key_global, m.key), (m.value_global, m.value)]:
    nnx.update(tied, nnx.state(own))
  weights = check_map_reproduces_output(m, x_input(), MASK, atol=1e-6)
  check_rows_and_masked_keys(weights, MASK, causal=causal)


@pytest.mark.parametrize("case", ["local", "longformer"])
def test_rope_is_applied_in_the_map(case):
  m = build(case, position="rope")
  x = x_input()
  weights = check_reproduces(m, x, MASK, atol=1e-6)
  check_rows_and_masked_keys(weights, MASK, causal=False)
  unrotated = build(case).attention_weights(x, mask=MASK)  # Same parameters (Rngs(0)).
  assert not np.allclose(weights, unrotated, atol=1e-3)


@pytest.mark.parametrize("case", ["dot_product", "memory_efficient", "local"])
def test_alibi_is_applied_in_the_map(case):
  m = build(case, position="alibi")
  x = x_input()
  weights = check_reproduces(m, x, MASK, atol=1e-6)
  check_rows_and_masked_keys(weights, MASK, causal=False)
  assert not np.allclose(weights, build(case).attention_weights(x, mask=MASK), atol=1e-3)


def test_every_variant_here_has_a_map():
  names = {"dot_product", "memory_efficient", "local", "sparse", "longformer", "bigbird"}
  assert names <= set(maps.available())
