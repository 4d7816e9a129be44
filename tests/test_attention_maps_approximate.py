"""The attention maps of the approximate attentions (`attention.maps`): linear, Performer,
Nystromformer, Linformer, Reformer, Sinkhorn and Synthesizer.

Each module's map must reproduce its output (out(map @ value(x)) == module(x) on real rows),
with padding and, where the variant can be causal, with causal=True. Variants normalised over
keys must have rows summing to 1 with zero weight on padded (and later) keys; Nystromformer's
and Linformer's rows are not normalised, but padded keys and padded query rows must still get
zero weight. A few exactness limits pin the maps against independent computations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import maps, reformer, sinkhorn
from efficient_transformers.attention.softmax import softmax_attention_weights
from tests.test_attention_maps import (
  BATCH,
  HEAD_DIM,
  HEADS,
  LENGTH,
  MASK,
  check_map_reproduces_output,
  check_rows_and_masked_keys,
  module,
  x_input,
)

# Variants whose map is normalised over keys (rows of real queries sum to 1).
NORMALISED = {"linear", "performer", "reformer", "sinkhorn", "synthesizer"}

REFORMER = {"chunk_size": 4, "num_buckets": 4, "num_hashes": 2}
SINKHORN = {"block_size": 4, "max_length": LENGTH}

# (name, kwargs, atol): settings that fit LENGTH = 16; atol about 2-4x the float32 error
# measured on CPU (Nystromformer's pseudo-inverse a little more).
CASES = [
  ("linear", {}, 1e-6),
  ("linear", {"position": "rope"}, 1e-6),
  ("performer", {"num_features": 16}, 1e-6),
  ("performer", {"num_features": 16, "kernel": "relu", "position": "rope"}, 1e-6),
  ("nystromformer", {"num_landmarks": 4}, 2e-6),
  ("nystromformer", {"num_landmarks": 4, "conv_kernel_size": 3}, 2e-6),
  ("nystromformer", {"num_landmarks": 4, "conv_kernel_size": 4}, 2e-6),
  ("linformer", {"k": 4, "max_length": LENGTH}, 1e-6),
  ("linformer", {"k": 4, "max_length": LENGTH, "share_kv": True, "share_heads": False}, 1e-6),
  ("reformer", REFORMER, 1e-6),
  ("sinkhorn", SINKHORN, 1e-6),
  *[
    (
      "synthesizer",
      {"max_length": LENGTH, "synthesizer": form, "factor": 4, "mix_dot_product": mix},
      1e-6,
    )
    for form in ("dense", "random", "factorized_dense", "factorized_random")
    for mix in (False, True)
  ],
]
PARAMS = [
  pytest.param(name, kwargs, atol, causal, id=f"{name}-{i}-{'causal' if causal else 'bidi'}")
  for i, (name, kwargs, atol) in enumerate(CASES)
  for causal in (False, True)
  if not causal or attention.get_class(name).supports_causal
]


def test_every_approximate_variant_has_a_map():
  variants = {"linear", "performer", "nystromformer", "linformer", "reformer", "sinkhorn"}
  assert variants | {"synthesizer"} <= set(maps.available())


@pytest.mark.parametrize("name, kwargs, atol, causal", PARAMS)
def test_map_reproduces_the_output(name, kwargs, atol, causal):
  m = module(name, causal=causal, **kwargs)
  # Reformer's map is that of the rotations its next call draws (the stream is not
  # advanced), so the helper's map-then-call compares one draw.
  weights = check_map_reproduces_output(m, x_input(), MASK, atol=atol)
  assert weights.dtype == np.float32 and np.all(np.isfinite(weights))
  if name in NORMALISED:
    check_rows_and_masked_keys(weights, MASK, causal=causal)
  else:
    real = np.asarray(MASK)
    for b in range(BATCH):
      assert np.all(weights[b][..., ~real[b]] == 0), "weight on a padded key"
      assert np.all(weights[b][:, ~real[b]] == 0), "a padded query row is not zero"
    # Not a trivial map: real rows carry weight.
    assert np.abs(weights[0]).sum() > 0


def test_nystromformer_convolution_adds_its_band():
  """With a convolution, the map is the convolution-free map plus a band of its kernel."""
  m = module("nystromformer", num_landmarks=4, conv_kernel_size=3)
  x = x_input()
  with_conv = m.attention_weights(x, mask=MASK)
  conv = m.conv_kernel[...]
  m.conv_kernel = None
  band = np.asarray(with_conv - m.attention_weights(x, mask=MASK))
  # Output i takes v_{i-1}, v_i, v_{i+1} with weights kernel[0], kernel[1], kernel[2].
  expected = sum(
    np.eye(LENGTH, k=t - 1)[None, :, :] * np.asarray(conv)[t][:, None, None] for t in range(3)
  )  # [heads, L, L]
  real = np.asarray(MASK)
  for b in range(BATCH):
    want = np.where(real[b][None, :, None] & real[b][None, None, :], expected, 0.0)
    np.testing.assert_allclose(band[b], want, atol=1e-6)


def test_linformer_identity_projections_are_softmax():
  """k = L with E = F = identity is exact softmax attention, so is its map."""
  q, k = (jax.random.normal(jax.random.key(s), (BATCH, LENGTH, HEADS, HEAD_DIM)) for s in (1, 2))
  weights = maps.attention_weights("linformer", q, k, mask=MASK, key_projection=jnp.eye(LENGTH))
  np.testing.assert_allclose(weights, softmax_attention_weights(q, k, mask=MASK), atol=1e-6)


def test_reformer_map_reproduces_the_next_call_and_leaves_the_stream():
  m = module("reformer", **REFORMER)
  x = x_input()
  first = m.attention_weights(x, mask=MASK)
  # The map peeks at the next call's rotations: the stream is not advanced.
  np.testing.assert_array_equal(first, m.attention_weights(x, mask=MASK))
  expected = nnx.clone(m)
  y = m(x, mask=MASK)
  np.testing.assert_allclose(y, expected(x, mask=MASK), atol=1e-6)
  # After the call, the map is that of the following draw, which hashes differently.
  second = m.attention_weights(x, mask=MASK)
  assert not np.allclose(first, second)
  # Explicit rotations: the map of reformer_attention_from_rotations with them.
  rotations = reformer.draw_rotations(jax.random.key(5), HEADS, HEAD_DIM, 2, 4)
  q, v = m.query(x), m.value(x)
  out = reformer.reformer_attention_from_rotations(q, v, rotations, mask=MASK, chunk_size=4)
  weights = m.attention_weights(x, mask=MASK, rotations=rotations)
  real = np.asarray(MASK)
  np.testing.assert_allclose(
    np.asarray(maps.apply_weights(weights, v))[real], np.asarray(out)[real], atol=1e-5
  )


def test_reformer_one_chunk_is_shared_qk_softmax():
  """One chunk over the whole sequence, one round: full shared-QK attention (self rule)."""
  q = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, HEADS, HEAD_DIM))
  weights = maps.attention_weights(
    "reformer",
    q,
    q,
    mask=MASK,
    key=jax.random.key(4),
    num_hashes=1,
    num_buckets=4,
    chunk_size=LENGTH,
  )
  logits = np.einsum("bqhd,bkhd->bhqk", q, reformer.normalize_keys(q)) / np.sqrt(HEAD_DIM)
  logits = np.where(np.eye(LENGTH, dtype=bool), reformer.SELF_LOGIT, logits)
  logits = np.where(np.asarray(MASK)[:, None, None, :], logits, -np.inf)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  real = np.asarray(MASK)
  for b in range(BATCH):
    np.testing.assert_allclose(weights[b][:, real[b]], expected[b][:, real[b]], atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_hard_permutation_is_softmax_under_its_pattern(causal):
  q, k = (jax.random.normal(jax.random.key(s), (BATCH, LENGTH, HEADS, HEAD_DIM)) for s in (6, 7))
  perm = [-1, 0, 1, 0] if causal else [2, 3, 1, 0]
  p = jnp.broadcast_to(sinkhorn.permutation_matrix(perm, 4), (BATCH, HEADS, 4, 4))
  weights = maps.attention_weights(
    "sinkhorn", q, k, mask=MASK, causal=causal, sort_matrix=p, block_size=4
  )
  pattern = sinkhorn.sinkhorn_pattern(LENGTH, perm, block_size=4, causal=causal)
  expected = softmax_attention_weights(q, k, mask=MASK, bias=np.where(pattern, 0.0, -1e9))
  np.testing.assert_allclose(weights, expected, atol=1e-6)
