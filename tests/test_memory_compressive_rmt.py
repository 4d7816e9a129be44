"""Compressive Transformer memory and reconstruction loss; RMT pattern, equivalence and
truncated BPTT; DecoderLM for every memory kind under jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.memory import memory_pattern, truncated_bptt
from efficient_transformers.models import CompressiveTransformer, RecurrentMemoryTransformer
from efficient_transformers.models.decoder import MEMORY_KINDS, DecoderLM

FEATURES = 16

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


def compressive(compression, **kwargs):
  sizes = dict(num_layers=1, features=FEATURES, num_heads=2, head_dim=8, mlp_dim=32)
  sizes.update(kwargs)
  return CompressiveTransformer(compression=compression, rngs=nnx.Rngs(0), **sizes)


@jit_apply
def xl_step(model, x, memory):
  return model.call_with_aux(x, memory)


def test_compressed_memory_fills_in_order():
  mem_len, cmem_len, rate, seg, reduce = 4, 3, 2, 2, np.mean
  model = compressive("mean", mem_len=mem_len, cmem_len=cmem_len, compression_rate=rate)
  x = np.random.default_rng(0).standard_normal((2, 6 * seg, FEATURES)).astype(np.float32)
  memory = model.init_memory(2)
  # The reference stream of layer 0's inputs (x itself), led by the empty slots.
  stream = [np.zeros((2, FEATURES), np.float32)] * mem_len
  stream_valid = [False] * mem_len
  squeezed = [np.zeros((2, FEATURES), np.float32)] * cmem_len
  squeezed_valid = [False] * cmem_len
  for t in range(6):
    _, memory, aux = xl_step(model, jnp.asarray(x[:, t * seg : (t + 1) * seg]), memory)
    stream += [x[:, t * seg + i] for i in range(seg)]
    stream_valid += [True] * seg
    evicted, evicted_valid = stream[-mem_len - seg : -mem_len], stream_valid[-mem_len - seg]
    for c in range(0, seg, rate):
      squeezed.append(reduce(np.stack(evicted[c : c + rate]), axis=0))
      squeezed_valid.append(evicted_valid)
    assert memory["compressed"].shape == (1, 2, cmem_len, FEATURES)
    expected = np.stack(squeezed[-cmem_len:], axis=1)
    np.testing.assert_allclose(memory["compressed"][0], expected, atol=1e-6, err_msg=f"step {t}")
    np.testing.assert_array_equal(memory["compressed_valid"][0], squeezed_valid[-cmem_len:])
    np.testing.assert_allclose(memory["hidden"][0], np.stack(stream[-mem_len:], 1), atol=1e-6)
    assert np.isfinite(aux["attention_reconstruction"])
  # After 12 tokens: 8 evicted, the newest 3 chunks of 2 are tokens 2..7.
  np.testing.assert_allclose(memory["compressed"][0, :, 0], reduce(x[:, 2:4], axis=1), atol=1e-6)
  assert memory["compressed_valid"].all()


def test_compression_functions():
  evicted = np.random.default_rng(5).standard_normal((2, 6, FEATURES)).astype(np.float32)
  chunks = evicted.reshape(2, 3, 2, FEATURES)
  kwargs = dict(mem_len=4, cmem_len=2, compression_rate=2)
  for name, expected in [("mean", chunks.mean(2)), ("max", chunks.max(2))]:
    got = compressive(name, **kwargs).memory.compress(0, jnp.asarray(evicted))
    np.testing.assert_allclose(got, expected, atol=1e-6)
  conv = compressive("conv", **kwargs)
  kernel, bias = conv.memory.compressors[0].kernel[...], conv.memory.compressors[0].bias[...]
  expected = np.einsum("bncf,cfg->bng", chunks, kernel) + bias  # kernel size = stride = rate
  np.testing.assert_allclose(conv.memory.compress(0, jnp.asarray(evicted)), expected, atol=1e-5)


def test_reconstruction_loss_trains_only_the_compressor():
  model = compressive("conv", mem_len=4, cmem_len=2, compression_rate=2)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 4, FEATURES)), jnp.float32)
  memory = model.init_memory(2)
  memory["hidden"] = jnp.asarray(rng.standard_normal((1, 2, 4, FEATURES)), jnp.float32)
  memory["valid"] = jnp.ones((2, 4), bool)

  compressor = nnx.All(nnx.Param, nnx.PathContains("compressors"))
  graphdef, trained, frozen, rest = nnx.split(model, compressor, nnx.Param, ...)
  tx = optax.adam(1e-2)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def train_step(trained, opt_state):
    def loss_fn(trained, frozen):
      model = nnx.merge(graphdef, trained, frozen, rest)
      return model.call_with_aux(x, memory)[2]["attention_reconstruction"]

    # Gradients for the frozen parameters too, so the test sees where the loss reaches.
    loss, (grads, frozen_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(trained, frozen)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(trained, updates), opt_state, loss, grads, frozen_grads

  opt_state, losses = tx.init(trained), []
  for _ in range(30):
    trained, opt_state, loss, grads, frozen_grads = train_step(trained, opt_state)
    losses.append(float(loss))
  assert all(np.any(g) for g in jax.tree.leaves(grads))
  assert not any(np.any(g) for g in jax.tree.leaves(frozen_grads))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses


def test_rmt_memory_pattern():
  t, f = True, False
  expected = [  # rows: read, seg0, seg1, write; columns the same
    [t, f, f, f],
    [t, t, f, f],
    [t, t, t, f],
    [t, t, t, t],
  ]
  np.testing.assert_array_equal(memory_pattern(1, 2), expected)
  pattern = memory_pattern(2, 3)
  assert pattern.shape == (7, 7)
  assert pattern[:, :2].all() and not pattern[:2, 2:].any()  # read: seen by all, sees read
  assert pattern[5:, 2:].all()  # write tokens see everything
  assert not pattern[2:5, 5:].any()  # the segment never sees the write tokens


def lm(memory, *, seed=0, **kwargs):
  sizes = dict(num_layers=1, emb_dim=FEATURES, num_heads=2, qkv_dim=FEATURES, mlp_dim=32)
  sizes.update(segment_length=4, dropout_rate=0.1)
  sizes.update(kwargs)
  return DecoderLM(memory=memory, rngs=nnx.Rngs(seed), **sizes)


@jit_apply
def lm_step(model, ids, memory, reset):
  return model(ids, memory, reset=reset)


def test_rmt_without_memory_tokens_equals_plain_decoder():
  plain, rmt = lm("none"), lm("rmt", num_memory_tokens=0, seed=1)
  ids = jnp.asarray([[5, 9, 200, 3], [7, 1, 0, 0]])
  no_reset = jnp.zeros((2,), bool)
  real = np.asarray(ids != 0)
  before = lm_step(rmt, ids, rmt.init_memory(2), no_reset)[0]
  expected = lm_step(plain, ids, plain.init_memory(2), no_reset)[0]
  assert not np.allclose(before[real], expected[real], atol=1e-3)
  nnx.update(rmt, nnx.state(plain, nnx.Param))
  got = lm_step(rmt, ids, rmt.init_memory(2), no_reset)[0]
  # Padded query rows differ by design (the plain attention zeroes them); compare the rest.
  np.testing.assert_allclose(got[real], expected[real], atol=1e-5)


def test_rmt_truncated_bptt():
  sizes = dict(num_layers=1, features=FEATURES, num_heads=2, head_dim=8, mlp_dim=32)
  rmt = RecurrentMemoryTransformer(num_memory_tokens=2, rngs=nnx.Rngs(0), **sizes)
  xs = jnp.asarray(np.random.default_rng(2).standard_normal((3, 2, 3, FEATURES)), jnp.float32)

  def segment_outputs(xs, bptt):
    memory = rmt.init_memory(2)
    results, _ = truncated_bptt(lambda s, m: rmt(s, m), list(xs), memory, bptt_segments=bptt)
    return [out for out, *_ in results]

  settings = (None, 1, 2)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def reach(xs):
    """Per setting: [loss of segment t, input segment s] |d loss_t / d xs_s| summed."""
    jacobians = [
      jax.jacrev(lambda xs, bptt=bptt: jnp.stack([o.sum() for o in segment_outputs(xs, bptt)]))(xs)
      for bptt in settings
    ]
    outputs = [segment_outputs(xs, bptt) for bptt in (None, 1)]
    return [jnp.abs(j).sum(axis=(2, 3, 4)) for j in jacobians], outputs

  jacobians, (uncut, cut) = reach(xs)
  reached = {bptt: np.asarray(j) > 0 for bptt, j in zip(settings, jacobians, strict=True)}
  lower = np.tril(np.ones((3, 3), bool))
  np.testing.assert_array_equal(reached[None], lower)  # through every segment's memory
  np.testing.assert_array_equal(reached[1], np.eye(3, dtype=bool))
  # Windows [0, 2) and [2, 3): segment 1 reaches back to 0, segment 2 only itself.
  np.testing.assert_array_equal(reached[2], [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
  # Truncation changes gradients only, not values.
  for a, b in zip(cut, uncut, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_rmt_reset_and_padding_segments():
  model = lm("rmt", num_memory_tokens=2)
  ids = jnp.asarray(np.random.default_rng(3).integers(1, 257, (2, 8)))
  no_reset = jnp.zeros((2,), bool)
  _, memory, _ = lm_step(model, ids[:, :4], model.init_memory(2), no_reset)
  padding = ids[:, 4:].at[0].set(0)  # row 0: a segment of padding only
  _, after, _ = lm_step(model, padding, memory, no_reset)
  np.testing.assert_array_equal(after["tokens"][0], memory["tokens"][0])
  assert not np.allclose(after["tokens"][1], memory["tokens"][1])
  reset = jnp.array([False, True])
  y, _, _ = lm_step(model, ids[:, 4:], memory, reset)
  y_fresh, _, _ = lm_step(model, ids[:, 4:], model.init_memory(2), no_reset)
  y_kept, _, _ = lm_step(model, ids[:, 4:], memory, no_reset)
  np.testing.assert_allclose(y[1], y_fresh[1], atol=1e-5)
  np.testing.assert_allclose(y[0], y_kept[0], atol=1e-5)
  assert not np.allclose(y_kept[1], y_fresh[1], atol=1e-3)


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_decoder_lm_every_memory_kind_under_jit(kind):
  # Two segments of 2: run() carries the memory from one to the next.
  model = lm(kind, segment_length=2, mem_len=4, cmem_len=2, compression_rate=2, num_memory_tokens=2)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 257, (2, 5)))
  inputs, targets = ids[:, :-1], ids[:, 1:]

  def loss_fn(model, memory):
    logits, memory, aux = model.run(inputs, memory, bptt_segments=1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = jnp.sum(nll * (targets != 0)) / jnp.sum(targets != 0) + sum(aux.values())
    return loss, (logits, memory, aux)

  step = jit_apply(nnx.value_and_grad(loss_fn, has_aux=True))
  (loss, (logits, memory, aux)), grads = step(model, model.init_memory(2))
  assert logits.shape == (2, 4, 257) and np.isfinite(loss)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  expected = {
    "none": {},
    "transformer_xl": {"hidden": (1, 2, 4, FEATURES), "valid": (2, 4)},
    "compressive": {
      "hidden": (1, 2, 4, FEATURES),
      "valid": (2, 4),
      "compressed": (1, 2, 2, FEATURES),
      "compressed_valid": (2, 2),
    },
    "rmt": {"tokens": (2, 2, FEATURES), "valid": (2,)},
  }[kind]
  assert jax.tree.map(jnp.shape, memory) == expected
  assert set(aux) == ({"attention_reconstruction"} if kind == "compressive" else set())


def test_config_errors():
  with pytest.raises(ConfigError, match="compression_rate"):
    lm("compressive", segment_length=5, compression_rate=2)
  with pytest.raises(ConfigError, match="compression_rate"):
    compressive("mean", mem_len=4, cmem_len=2, compression_rate=0)
  with pytest.raises(ConfigError, match="compression"):
    compressive("median", mem_len=4, cmem_len=2, compression_rate=2)
  with pytest.raises(ConfigError, match="cmem_len"):
    compressive("mean", mem_len=4, cmem_len=-1, compression_rate=2)
  with pytest.raises(ConfigError, match="mem_len"):
    compressive("mean", mem_len=-1, cmem_len=2, compression_rate=2)
  model = compressive("mean", mem_len=4, cmem_len=2, compression_rate=2)
  with pytest.raises(ConfigError, match="segment_length=3"):
    model(jnp.zeros((1, 3, FEATURES)), model.init_memory(1))
  with pytest.raises(ConfigError, match="num_memory_tokens"):
    lm("rmt", num_memory_tokens=-1)
  with pytest.raises(ConfigError, match="bptt_segments"):
    truncated_bptt(lambda s, m: (s, m), [1], {}, bptt_segments=0)
  with pytest.raises(ConfigError, match="memory"):
    lm("xl")
  with pytest.raises(ConfigError, match="segment length"):
    lm("none").run(jnp.ones((1, 6), jnp.int32), {})
