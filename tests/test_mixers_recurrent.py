"""The `lstm` and `gru` mixers: against hand-written cell loops, padding, causality, step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.mixers import recurrent, registry

BATCH, LENGTH, FEATURES = 2, 10, 8
# Right padding, this project's layout: row 0 is full, row 1 has 6 real tokens.
LENGTHS = np.array([LENGTH, 6])
MASK = jnp.asarray(np.arange(LENGTH)[None] < LENGTHS[:, None])


def _make(name, *, causal, **kwargs):
  """A mixer with every parameter perturbed, as if trained. Flax initialises the biases to
  zero, and then a zero input from a zero carry stays exactly zero in both cells: the
  backward direction would pass over zeroed padding unharmed even without seq_lengths,
  and the padding tests could not fail."""
  m = registry.make(
    name, in_features=FEATURES, num_heads=2, head_dim=4, causal=causal, rngs=nnx.Rngs(0), **kwargs
  )
  noise = np.random.default_rng(42)  # numpy: no per-shape compile of jax.random
  perturb = lambda p: p + 0.3 * noise.standard_normal(p.shape, np.float32)
  nnx.update(m, jax.tree.map(perturb, nnx.state(m, nnx.Param)))
  return m


def _x(seed=0, length=LENGTH):
  return jax.random.normal(jax.random.key(seed), (BATCH, length, FEATURES))


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _p(linear):
  """(kernel, bias or 0) of an nnx.Linear, in float64."""
  bias = 0.0 if linear.bias is None else np.asarray(linear.bias[...], np.float64)
  return np.asarray(linear.kernel[...], np.float64), bias


def _lstm_loop(cell, x):
  """x [time, features] -> h [time, hidden]; Flax's LSTM: i, f, g, o; one bias, in dense_h."""
  wi, _ = _p(cell.dense_i)
  wh, b = _p(cell.dense_h)
  hidden = wh.shape[0]
  c = h = np.zeros(hidden)
  out = []
  for x_t in np.asarray(x, np.float64):
    i, f, g, o = np.split(x_t @ wi + h @ wh + b, 4)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    out.append(h)
  return np.stack(out)


def _gru_loop(cell, x):
  """x [time, features] -> h [time, hidden]; Flax's GRU: the input bias (dense_i) is outside
  the reset gate, and r multiplies the recurrent term W_hn h (dense_h has no bias)."""
  wi, bi = _p(cell.dense_i)
  wh, _ = _p(cell.dense_h)
  h = np.zeros(wh.shape[0])
  out = []
  for x_t in np.asarray(x, np.float64):
    xr, xz, xn = np.split(x_t @ wi + bi, 3)
    hr, hz, hn = np.split(h @ wh, 3)
    r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
    n = np.tanh(xn + r * hn)
    h = (1.0 - z) * n + z * h
    out.append(h)
  return np.stack(out)


_LOOPS = {"lstm": _lstm_loop, "gru": _gru_loop}


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_causal_equals_hand_written_cell_loop(name):
  # hidden_size != in_features, so the output projection is part of what is compared.
  m = _make(name, causal=True, hidden_size=12)
  x = _x()
  y = np.asarray(m(x, mask=MASK))
  kernel, bias = _p(m.out)
  for b in range(BATCH):
    n = LENGTHS[b]
    want = _LOOPS[name](m.rnn.cell, x[b, :n]) @ kernel + bias
    np.testing.assert_allclose(y[b, :n], want, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(y[b, n:], 0.0)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_bidirectional_backward_reverses_only_the_real_part(name):
  """nnx.Bidirectional hands seq_lengths to the backward RNN, whose flip_sequences reverses
  each row's real tokens only: the backward direction starts at the last real token. Were
  it to start at the padding (a plain flip), row 1's outputs would differ from this loop."""
  m = _make(name, causal=False)
  x = _x(1)
  y = np.asarray(m(x, mask=MASK))
  kernel, bias = _p(m.out)
  loop = _LOOPS[name]
  for b in range(BATCH):
    n = LENGTHS[b]
    fwd = loop(m.rnn.forward_rnn.cell, x[b, :n])
    bwd = loop(m.rnn.backward_rnn.cell, x[b, :n][::-1])[::-1]
    want = np.concatenate([fwd, bwd], -1) @ kernel + bias
    np.testing.assert_allclose(y[b, :n], want, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(y[b, n:], 0.0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_padding_changes_nothing_real(name, causal):
  m = _make(name, causal=causal)
  x = _x(2)
  noise = _x(3) * 100.0
  x_other = jnp.where(MASK[..., None], x, noise)
  y, y_other = m(x, mask=MASK), m(x_other, mask=MASK)
  np.testing.assert_allclose(y, y_other, atol=1e-6)
  # The same row alone, trimmed to its real tokens and unmasked, gives the same outputs.
  n = int(LENGTHS[1])
  y_alone = m(x[1:, :n], mask=None)
  np.testing.assert_allclose(y[1, :n], y_alone[0], atol=1e-5)
  if not causal:
    # The test can fail: unmasked, the backward direction reads the changed tokens.
    assert not np.allclose(m(x, mask=None)[1, :n], m(x_other, mask=None)[1, :n], atol=1e-3)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_causal_ignores_the_future_and_bidirectional_does_not(name):
  t = 4
  x = _x(4)
  x_later = x.at[:, t + 1 :].add(1.0)
  causal = _make(name, causal=True)
  y, y_later = causal(x, mask=MASK), causal(x_later, mask=MASK)
  np.testing.assert_allclose(y[:, : t + 1], y_later[:, : t + 1], atol=1e-6)
  assert not np.allclose(y[:, t + 1 : 6], y_later[:, t + 1 : 6], atol=1e-4)
  both = _make(name, causal=False)
  y, y_later = both(x, mask=MASK), both(x_later, mask=MASK)
  assert not np.allclose(y[:, : t + 1], y_later[:, : t + 1], atol=1e-4)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_step_equals_full_causal_forward(name):
  m = _make(name, causal=True, hidden_size=12)
  assert type(m).supports_step
  x = _x(5)
  full = m(x)
  step = nnx.jit(lambda m, x_t, s: m.step(x_t, s))
  state = m.init_state(BATCH)
  ys = []
  for t in range(LENGTH):
    y_t, state = step(m, x[:, t], state)
    ys.append(y_t)
  np.testing.assert_allclose(jnp.stack(ys, 1), full, atol=1e-5)
  with pytest.raises(ConfigError, match="causal=True"):
    _make(name, causal=False).init_state(BATCH)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_gradients_are_finite_and_reach_every_parameter(name):
  m = _make(name, causal=False)
  # NaN at padded positions must not reach the gradients (the inputs there are zeroed).
  x = jnp.where(MASK[..., None], _x(6), jnp.nan)

  def loss(m):
    return jnp.sum(m(x, mask=MASK) ** 2)

  grads = nnx.grad(loss)(m)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert len(leaves) == 8  # 2 cells x (2 kernels + 1 bias), and the projection's 2
  for g in leaves:
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_registry_and_refusals():
  assert {"lstm", "gru"} <= set(registry.available(causal=True))
  assert set(registry.mixer_kwargs("lstm")) == {"hidden_size"}
  m = _make("lstm", causal=True)
  assert isinstance(m, recurrent.LSTMMixer) and m.out is None
  assert isinstance(_make("gru", causal=False), recurrent.GRUMixer)
  with pytest.raises(ConfigError, match="hidden_sise") as err:
    _make("gru", causal=True, hidden_sise=4)
  assert err.value.argument == "attention_kwargs.hidden_sise"
  with pytest.raises(ConfigError, match="position"):
    _make("lstm", causal=True, position="rope")
  with pytest.raises(ConfigError, match="memory context"):
    m(_x(), context=_x())
  with pytest.raises(ConfigError, match="hidden_size"):
    _make("gru", causal=True, hidden_size=0)
