"""Transformer-XL: the relative shift and attention against naive references, cached
incremental evaluation against full recomputes, the stop-gradient memory, resets."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.memory import (
  relative_attention,
  relative_shift,
  reset_memory,
  sinusoidal_relative_encoding,
)
from efficient_transformers.models import TransformerXL
from efficient_transformers.models.decoder import DecoderLM

FEATURES, HEADS, LAYERS = 16, 2, 2

# The tests check numerics, not speed: compiling without XLA's backend (LLVM)
# optimization roughly halves the CPU compile time that dominates these tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit_apply(fn):
  """jax.jit of fn(model, *args) -> arrays, the model passed as (static graphdef, state).

  Modules of one structure share compiles.
  """
  compiled = jax.jit(
    lambda graphdef, state, *args: fn(nnx.merge(graphdef, state), *args),
    static_argnums=0,
    compiler_options=FAST_COMPILE,
  )
  return lambda model, *args: compiled(*nnx.split(model), *args)


def naive_relative_shift(x):
  """out[..., i, j] = x[..., i, (klen - 1) - distance(i, j)], distance = mlen + i - j."""
  *_, qlen, klen = x.shape
  mlen = klen - qlen
  out = np.zeros_like(x)
  for i in range(qlen):
    for j in range(mlen + i + 1):
      out[..., i, j] = x[..., i, klen - 1 - (mlen + i - j)]
  return out


def naive_relative_attention(q, k, v, r, u, vb, mask):
  """Per (batch, head, i, j) loops with explicit distances; float64 numpy."""
  q, k, v, r, u, vb = (np.asarray(a, np.float64) for a in (q, k, v, r, u, vb))
  batch, qlen, heads, dim = q.shape
  klen = k.shape[1]
  mlen = klen - qlen
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      for i in range(qlen):
        scores = {}
        for j in range(klen):
          distance = mlen + i - j
          if distance < 0 or not mask[b, j]:
            continue
          content = (q[b, i, h] + u[h]) @ k[b, j, h]
          position = (q[b, i, h] + vb[h]) @ r[klen - 1 - distance, h]
          scores[j] = (content + position) / math.sqrt(dim)
        if not scores:
          continue  # No visible key: the row is zero.
        top = max(scores.values())
        weights = {j: math.exp(s - top) for j, s in scores.items()}
        total = sum(weights.values())
        out[b, i, h] = sum(w / total * v[b, j, h] for j, w in weights.items())
  return out


@pytest.mark.parametrize("qlen,klen", [(1, 1), (3, 3), (3, 7), (4, 9), (1, 5), (5, 6)])
def test_relative_shift_matches_gather(qlen, klen):
  x = np.random.default_rng(qlen * 10 + klen).standard_normal((2, 3, qlen, klen))
  x = x.astype(np.float32)
  got = np.asarray(relative_shift(jnp.asarray(x)))
  causal = np.arange(klen)[None, :] <= (klen - qlen) + np.arange(qlen)[:, None]
  np.testing.assert_array_equal(np.where(causal, got, 0.0), naive_relative_shift(x))
  assert np.isfinite(got).all()


def test_sinusoidal_relative_encoding_is_descending_distance():
  enc = np.asarray(sinusoidal_relative_encoding(5, 4))
  # features=4: timescales 1 and 100; distance d -> [sin d, sin d/100, cos d, cos d/100].
  for row, distance in enumerate([4, 3, 2, 1, 0]):
    expected = [
      math.sin(distance),
      math.sin(distance / 100),
      math.cos(distance),
      math.cos(distance / 100),
    ]
    np.testing.assert_allclose(enc[row], expected, atol=1e-6)


def test_relative_attention_matches_loop():
  rng = np.random.default_rng(0)
  batch, qlen, mlen, heads, dim = 2, 3, 2, 2, 4
  klen = qlen + mlen
  q = rng.standard_normal((batch, qlen, heads, dim)).astype(np.float32)
  k, v = (rng.standard_normal((batch, klen, heads, dim)).astype(np.float32) for _ in range(2))
  r = rng.standard_normal((klen, heads, dim)).astype(np.float32)
  u, vb = (rng.standard_normal((heads, dim)).astype(np.float32) for _ in range(2))
  # Row 1: both memory slots and the first token empty -> its query 0 sees no key.
  mask = np.array([[True, False, True, True, True], [False, False, False, True, True]])
  got = relative_attention(*(jnp.asarray(a) for a in (q, k, v, r, u, vb)), mask=jnp.asarray(mask))
  expected = naive_relative_attention(q, k, v, r, u, vb, mask)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
  assert np.all(np.asarray(got)[1, 0] == 0.0)


def make_xl(mem_len, num_layers=LAYERS, **kwargs):
  return TransformerXL(
    num_layers=num_layers,
    features=FEATURES,
    num_heads=HEADS,
    head_dim=FEATURES // HEADS,
    mlp_dim=32,
    mem_len=mem_len,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


def inputs(length, seed=1, batch=2):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, FEATURES)))


# One module configuration for the forward tests (mem_len only sets init_memory's
# default, always overridden here), so nnx.jit compiles each input shape once.
XL = make_xl(mem_len=12)


@jit_apply
def _step(model, x, memory, mask, reset):
  return model(x, memory, mask=mask, reset=reset)


def step(model, x, memory, mask=None, reset=None):
  """One jitted call; mask and reset are always arrays, so they share compiles."""
  batch, seg = x.shape[:2]
  mask = jnp.ones((batch, seg), bool) if mask is None else mask
  reset = jnp.zeros((batch,), bool) if reset is None else reset
  return _step(model, x, memory, mask, reset)


def run_in_segments(model, x, memory, seg, mask=None):
  """Feeds x [batch, length, features] `seg` positions at a time (one compile per seg)."""
  if mask is None:
    mask = jnp.ones(x.shape[:2], bool)
  outs = []
  for start in range(0, x.shape[1], seg):
    y, memory = step(model, x[:, start : start + seg], memory, mask[:, start : start + seg])
    outs.append(y)
  return jnp.concatenate(outs, axis=1), memory


def test_incremental_evaluation_equals_full_recompute():
  model = XL
  x = inputs(12).astype(jnp.float32)
  mask = jnp.ones((2, 12), bool).at[1, 5].set(False)  # a padded token mid-stream
  full, _ = step(model, x, model.init_memory(2, mem_len=0), mask)
  full_empty_memory, _ = step(model, x, model.init_memory(2, mem_len=12), mask)
  np.testing.assert_allclose(full_empty_memory, full, atol=1e-5)
  for seg in (4, 1):
    got, memory = run_in_segments(model, x, model.init_memory(2, mem_len=12), seg, mask)
    np.testing.assert_allclose(got, full, atol=1e-5, err_msg=f"segment length {seg}")
  assert memory["hidden"].shape == (LAYERS, 2, 12, FEATURES)
  np.testing.assert_array_equal(memory["valid"], mask)
  # Layer 0's memory is its input, the embedded stream itself.
  np.testing.assert_allclose(memory["hidden"][0], x, atol=1e-6)


def test_longer_memory_at_evaluation():
  model = XL
  x = inputs(12, seed=2).astype(jnp.float32)
  full, _ = run_in_segments(model, x, model.init_memory(2, mem_len=0), 12)
  # Trained with 4 slots (make_xl(mem_len=4) would make this memory by default).
  assert make_xl(mem_len=4, num_layers=1).init_memory(2)["valid"].shape == (2, 4)
  short, memory = run_in_segments(model, x, model.init_memory(2, mem_len=4), 4)
  assert memory["hidden"].shape == (LAYERS, 2, 4, FEATURES)
  np.testing.assert_allclose(short[:, :8], full[:, :8], atol=1e-5)
  # With 4 slots the third segment cannot see the first: the results must differ.
  assert not np.allclose(short[:, 8:], full[:, 8:], atol=1e-3)
  long, memory = run_in_segments(model, x, model.init_memory(2, mem_len=12), 4)
  assert memory["hidden"].shape == (LAYERS, 2, 12, FEATURES)
  np.testing.assert_allclose(long, full, atol=1e-5)


def test_no_gradient_through_memory():
  x1, x2 = inputs(4, seed=3), inputs(4, seed=4)
  for stop in (True, False):
    # Two layers: layer 0's memory is the embedded input, which no parameter touches.
    model = make_xl(mem_len=4, stop_memory_gradient=stop)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, x, memory, graphdef=graphdef, rest=rest):
      return nnx.merge(graphdef, params, rest)(x, memory)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def gradients(params, empty):
      memory = apply(params, x1, empty)[1]

      def through_memory(hidden):
        y, new = apply(params, x2, {"hidden": hidden, "valid": memory["valid"]})
        return y.sum() + new["hidden"].sum()

      # d(next-step loss)/d(previous-step parameters), through the memory only: the
      # second step takes its own, constant copy of the parameters.
      def next_step_loss(first):
        return apply(params, x2, apply(first, x1, empty)[1])[0].sum()

      return jax.grad(through_memory)(memory["hidden"]), jax.grad(next_step_loss)(params)

    grad, cross = gradients(params, model.init_memory(2))
    cross = jax.tree.leaves(cross)
    if stop:
      assert not np.any(grad), "gradient reached the input memory"
      assert all(not np.any(g) for g in cross), "gradient crossed the segment boundary"
    else:  # The same checks must see gradients when the stop is off.
      assert np.any(grad)
      assert any(np.any(g) for g in cross)


def test_reset_rows_start_fresh():
  model = XL
  x = inputs(12, seed=5).astype(jnp.float32)
  _, memory = run_in_segments(model, x[:, :8], model.init_memory(2, mem_len=12), 4)
  reset = jnp.array([True, False])
  cleared = reset_memory(memory, reset)
  assert not cleared["valid"][0].any() and not np.any(cleared["hidden"][:, 0])
  np.testing.assert_array_equal(cleared["hidden"][:, 1], memory["hidden"][:, 1])
  y, new = step(model, x[:, 8:], memory, reset=reset)
  y_fresh, new_fresh = step(model, x[:, 8:], model.init_memory(2, mem_len=12))
  y_kept, new_kept = step(model, x[:, 8:], memory)
  np.testing.assert_allclose(y[0], y_fresh[0], atol=1e-6)
  np.testing.assert_allclose(y[1], y_kept[1], atol=1e-6)
  assert not np.allclose(y_kept[0], y_fresh[0], atol=1e-3)  # the memory mattered
  np.testing.assert_allclose(new["hidden"][:, 0], new_fresh["hidden"][:, 0], atol=1e-6)
  np.testing.assert_array_equal(new["valid"][0], new_fresh["valid"][0])
  np.testing.assert_allclose(new["hidden"][:, 1], new_kept["hidden"][:, 1], atol=1e-6)


def test_decoder_lm_token_by_token_equals_segments():
  model = DecoderLM(
    num_layers=1,
    emb_dim=FEATURES,
    num_heads=HEADS,
    qkv_dim=FEATURES,
    mlp_dim=32,
    segment_length=4,
    memory="transformer_xl",
    mem_len=8,
    rngs=nnx.Rngs(0),
  )
  ids = jnp.asarray(np.random.default_rng(6).integers(1, 257, (2, 8)))
  lm_step = jit_apply(lambda model, ids, memory: model(ids, memory)[:2])

  def score(seg):
    memory, logits = model.init_memory(2), []
    for start in range(0, 8, seg):
      out, memory = lm_step(model, ids[:, start : start + seg], memory)
      logits.append(out)
    return jnp.concatenate(logits, axis=1), memory

  by_segment, _ = score(4)
  by_token, memory = score(1)
  np.testing.assert_allclose(by_token, by_segment, atol=1e-4)
  assert by_token.shape == (2, 8, 257) and memory["hidden"].shape == (1, 2, 8, FEATURES)


def test_config_errors():
  with pytest.raises(ConfigError, match="mem_len"):
    make_xl(mem_len=-1)
  with pytest.raises(ConfigError, match="mem_len"):
    make_xl(mem_len=2).init_memory(2, mem_len=-3)
  lm_kwargs = dict(num_layers=1, emb_dim=16, mlp_dim=32, segment_length=4, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="mem_len"):
    DecoderLM(num_heads=2, qkv_dim=16, memory="transformer_xl", mem_len=-1, **lm_kwargs)
  with pytest.raises(ConfigError, match="num_heads"):
    DecoderLM(num_heads=3, qkv_dim=16, memory="transformer_xl", **lm_kwargs)
  with pytest.raises(ConfigError, match="memory"):
    DecoderLM(num_heads=2, qkv_dim=16, memory="lstm", **lm_kwargs)
