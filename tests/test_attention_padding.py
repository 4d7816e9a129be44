"""Appending padding leaves real tokens' outputs unchanged, for every registered attention.

DESIGN.md's padding contract has two halves: replacing what sits in padded
positions (checked in each test_attention_*.py with `replace_padded`) and
appending more padding, checked here for every name in
`attention.available()`: the pure function with fixed parameters, and the
module built by `attention.make` where it holds what its kernel depends on,
causal too where the variant supports it.

The inputs: 29 real tokens in row 0 (right padding) and, in row 1, holes among
the first 23 positions (its last real token at 22), in a sequence of 32, then
with fresh random content appended up to 40 and up to 64; both are compared
with the 32. Blocks and chunks are 4 or 8 tokens, so neither real length is a
multiple of them, and the lengths have different block counts: at 32 the last
block or chunk holds real tokens (a first chunk looking back cyclically would
see them), at 40 and 64 there are 1 and 4 more chunks of 8 (BigBird: 8 real
blocks of 4 in 8, 10 or 16). Randomness is held equal across lengths: fixed
rotations, features and seeds for the pure functions; the module is run at
both lengths from the same state, so Reformer's hashing stream draws the same
rotations (they do not depend on the length).

Tolerance: float32 (eps 1.2e-7) outputs are averages of values of size ~1. A
padding-invariant kernel sees the same real keys at both lengths; only the
shapes of its reductions and tiles change (more masked zeros, another chunk),
which reorders float32 sums: a few tens of roundings, measured at most 5e-7
here. atol 1e-5 leaves that margin, while a kernel whose layout moves with the
padded length differs by ~0.1-2 (BigBird before its fix: 1.3).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import (
  bigbird,
  dot_product,
  linear,
  linformer,
  local,
  longformer,
  memory_efficient,
  nystromformer,
  performer,
  reformer,
  sinkhorn,
  softmax,
  sparse,
  synthesizer,
)
from tests import attention_reference as reference

SHORT, LENGTHS = 32, (40, 64)  # the sequence, then padded further; 64 is also max_length
LONG = LENGTHS[-1]
ATOL = 1e-5
NOT_CAUSAL = {"bigbird", "linformer", "nystromformer"}  # they raise a ConfigError for causal
IN_FEATURES = 16


def padding_mask(length=SHORT):
  """[2, length]: row 0 has 29 real tokens then padding; row 1 has holes, last real at 22."""
  holes = np.random.default_rng(0).random(length) < 0.7
  holes[[0, 22]] = True
  positions = np.arange(length)
  return jnp.asarray(np.stack([positions < 29, holes & (positions < 23)]))


def _params(seed, *shape):
  """Fixed standard-normal parameters drawn with numpy (no PRNG kernel to compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


H, D = reference.HEADS, reference.HEAD_DIM
ROTATIONS = _params(1, H, 2, D, 2)  # Reformer: 2 rounds of 4 buckets
FEATURES = _params(2, 16, D)  # Performer: 16 features
PROJECTIONS = _params(3, LONG, 8) / 8.0, _params(4, LONG, 8) / 8.0  # Linformer E, F
SORT_WEIGHTS = 3.0 * _params(5, H, D, sinkhorn.max_blocks(LONG, 8))
SYNTH = 0.3 * _params(6, H, D, LONG), _params(7, H, LONG)  # dense synthesizer W2, b2


def _reformer(q, k, v, *, mask, causal):
  del k  # shared QK
  return reformer.reformer_attention_from_rotations(
    q, v, ROTATIONS, mask=mask, causal=causal, chunk_size=8
  )


def _synthesizer(q, k, v, *, mask, causal):
  logits = synthesizer.dense_synthesizer_logits(q, *SYNTH)
  return synthesizer.synthesizer_attention(
    logits, v, q=q, k=k, mask=mask, causal=causal, mix_weights=(0.7, 0.3)
  )


# fn(q, k, v, *, mask, causal) per registered name; "name/form" adds a form of a variant.
PURE = {
  "softmax": softmax.softmax_attention,
  "dot_product": dot_product.dot_product_attention,
  "memory_efficient": functools.partial(
    memory_efficient.memory_efficient_attention, query_chunk_size=8, key_chunk_size=8
  ),
  "local": functools.partial(local.local_attention, block_size=8),
  "sparse": functools.partial(sparse.sparse_attention, block_size=8, num_summary=2),
  "longformer": functools.partial(
    longformer.longformer_attention, window=5, global_positions=(0, 3)
  ),
  "bigbird": functools.partial(
    bigbird.bigbird_attention, block_size=4, num_random_blocks=2, layout_key=3
  ),
  "bigbird/one_global": functools.partial(
    bigbird.bigbird_attention, block_size=4, num_global_blocks=1, num_random_blocks=2
  ),
  "reformer": _reformer,
  "linformer": lambda q, k, v, **kw: linformer.linformer_attention(q, k, v, *PROJECTIONS, **kw),
  "performer": lambda q, k, v, **kw: performer.performer_attention(
    q, k, v, FEATURES, chunk_size=8, **kw
  ),
  "linear": functools.partial(linear.linear_attention, chunk_size=8),
  "sinkhorn": lambda q, k, v, **kw: sinkhorn.sinkhorn_attention(
    q, k, v, SORT_WEIGHTS, block_size=8, **kw
  ),
  "nystromformer": functools.partial(nystromformer.nystromformer_attention, num_landmarks=4),
  "synthesizer": _synthesizer,
}

# attention.make kwargs of the variants whose module holds what its kernel depends on:
# parameters tied to max_length (Linformer, Sinkhorn, Synthesizer), BigBird's layout
# seed, Performer's features, Reformer's hashing stream. The other modules pass q, k, v
# straight to the pure function checked above.
MODULES = {
  "bigbird": dict(block_size=4, num_random_blocks=2),
  "reformer": dict(chunk_size=8, num_buckets=4),
  "linformer": dict(max_length=LONG, k=8),
  "performer": dict(num_features=16, chunk_size=8),
  "sinkhorn": dict(block_size=8, max_length=LONG),
  "synthesizer": dict(max_length=LONG, mix_dot_product=True),
  "synthesizer/random": dict(synthesizer="random", max_length=LONG),
  "synthesizer/factorized_dense": dict(synthesizer="factorized_dense", factor=8, max_length=LONG),
  "synthesizer/factorized_random": dict(synthesizer="factorized_random", rank=4, max_length=LONG),
}


def _causal_modes(key):
  return (False,) if key.split("/")[0] in NOT_CAUSAL else (False, True)


def _module_cases():
  # The synthesizer's forms differ in their logits only; its causal mask is one code path.
  return [
    pytest.param(key, causal, id=f"{key}-{'causal' if causal else 'bidirectional'}")
    for key in sorted(MODULES)
    for causal in _causal_modes(key)
    if not (causal and key.startswith("synthesizer/"))
  ]


def padded_inputs(arrays, seed, lengths=LENGTHS):
  """[(arrays, mask)] at SHORT, then with padding appended up to each of `lengths`."""
  mask = padding_mask()
  return [(arrays, mask)] + [
    reference.append_padding(arrays, mask, n, seed=seed + n) for n in lengths
  ]


def assert_real_rows_unchanged(outs, masks):
  """Real rows at every length equal those at SHORT (to ATOL); padded rows are 0."""
  outs, masks = [np.asarray(x) for x in outs], [np.asarray(m) for m in masks]
  real = masks[0]
  assert np.abs(outs[0][real]).max() > 1e-2  # the real rows are not trivially zero
  for out in outs[1:]:
    diff = np.abs(out[:, :SHORT] - outs[0])[real].max()
    assert diff <= ATOL, f"length {out.shape[1]}: max |difference| of real outputs {diff:.3g}"
  for out, mask in zip(outs, masks, strict=True):
    np.testing.assert_array_equal(out[~mask], 0.0)


def test_tables_cover_every_registered_attention():
  assert {key.split("/")[0] for key in PURE} == set(attention.available())
  with_max_length = {
    name
    for name in attention.available()
    if "max_length" in attention.registry.variant_kwargs(name)
  }
  assert with_max_length == {"linformer", "sinkhorn", "synthesizer"}
  assert with_max_length <= {key.split("/")[0] for key in MODULES}


@pytest.mark.parametrize("key", sorted(PURE))
def test_pure_function_appended_padding(key):
  inputs = padded_inputs(reference.random_qkv(11, SHORT), seed=12)

  # One compilation for every length and causal mode: the suite spends its time compiling.
  @jax.jit
  def run(inputs):
    fns = [functools.partial(PURE[key], causal=c) for c in _causal_modes(key)]
    return [[fn(*qkv, mask=mask) for qkv, mask in inputs] for fn in fns]

  for outs in run(inputs):
    assert_real_rows_unchanged(outs, [mask for _, mask in inputs])


@functools.cache
def _module_runner(graphdef):
  """Runs the module from the same state at every length (one compilation)."""

  @jax.jit
  def run(state, inputs):
    # Copies: every call starts from the same RNG counts, so a variant drawing per call
    # (Reformer's hashing) draws the same at every length. Without copy=True the merges
    # share the count variables and each call hashes afresh.
    return [nnx.merge(graphdef, state, copy=True)(x, mask=mask) for (x,), mask in inputs]

  return run


@pytest.mark.parametrize("key, causal", _module_cases())
def test_module_appended_padding(key, causal):
  name = key.split("/")[0]
  module = attention.make(
    name,
    in_features=IN_FEATURES,
    num_heads=H,
    head_dim=D,
    causal=causal,
    rngs=nnx.Rngs(params=0, dropout=1),
    **MODULES[key],
  )
  # Only the longest padding: the kernels met every length above.
  x = _params(13, reference.BATCH, SHORT, IN_FEATURES)
  inputs = padded_inputs((x,), seed=14, lengths=(LONG,))
  graphdef, state = nnx.split(module)
  outs = _module_runner(graphdef)(state, inputs)
  assert_real_rows_unchanged(outs, [mask for _, mask in inputs])
