"""The conv and S4D mixers: against numpy references, padding, causality, decoding, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.mixers import conv, registry, s4d

BATCH, LENGTH, FEATURES, STATE = 2, 32, 8, 4


def make(name, *, causal, **kwargs):
  return registry.make(
    name,
    in_features=FEATURES,
    num_heads=2,
    head_dim=FEATURES // 2,
    causal=causal,
    rngs=nnx.Rngs(0),
    **kwargs,
  )


def make_s4d(*, causal, **kwargs):
  m = make("s4d", causal=causal, state_size=STATE, **kwargs)
  # Spread dt over the whole init range and away from it, so the kernel decays visibly
  # within the test's length (dt ~ 0.001 would leave K nearly constant).
  m.log_dt[...] = jnp.linspace(np.log(0.01), np.log(0.5), FEATURES)
  return m


def inputs(seed=0, length=LENGTH):
  return jax.random.normal(jax.random.key(seed), (BATCH, length, FEATURES))


def padding_mask(length=LENGTH):
  """Row 0: right padding; row 1: padding on both sides."""
  t = np.arange(length)
  return jnp.asarray(np.stack([t < length - 7, (t >= 3) & (t < length - 5)]))


# --- S4D: the FFT convolution against the recurrence -------------------------------------


def ssm_recurrence(m: s4d.S4DMixer, x: np.ndarray) -> np.ndarray:
  """The discretized SSM as a loop over time, in complex128 numpy, from m's parameters."""
  A = -np.exp(np.asarray(m.log_A_real[...], np.float64)) + 1j * np.asarray(m.A_imag[...])
  dt = np.exp(np.asarray(m.log_dt[...], np.float64))[:, None]
  dA = np.exp(dt * A)
  dB = (dA - 1.0) / A
  c = np.asarray(m.C[...], np.float64)
  C = c[..., 0] + 1j * c[..., 1]  # [channels, H, N]
  x = np.asarray(x, np.float64)
  batch, length, h = x.shape
  y = np.asarray(m.D[...], np.float64) * x
  state = np.zeros((batch, h, dA.shape[-1]), complex)
  for t in range(length):
    state = dA * state + dB * x[:, t, :, None]
    y[:, t] += 2.0 * np.einsum("hn,bhn->bh", C[0], state).real
  if m.bidirectional:
    # Backward: the state at t holds x[s] for s > t, lags s - t - 1.
    state = np.zeros_like(state)
    for t in range(length - 1, -1, -1):
      y[:, t] += 2.0 * np.einsum("hn,bhn->bh", C[1], state).real
      state = dA * state + dB * x[:, t, :, None]
  return y


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_s4d_fft_convolution_equals_recurrence(causal):
  m = make_s4d(causal=causal)
  assert m.bidirectional is not causal
  x = inputs()
  got = np.asarray(nnx.jit(lambda m, x: m.ssm(x))(m, x))
  want = ssm_recurrence(m, x)
  assert np.abs(want).max() > 0.1  # the SSM does something
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_s4d_step_equals_causal_forward():
  m = make_s4d(causal=True)
  assert m.supports_step
  x = inputs(1)
  full = m(x)
  state = m.init_state(BATCH)
  assert state.shape == (BATCH, FEATURES, STATE) and jnp.iscomplexobj(state)
  graphdef, params = nnx.split(m)
  step = jax.jit(lambda x_t, s: nnx.merge(graphdef, params).step(x_t, s))
  outs = []
  for t in range(LENGTH):
    y_t, state = step(x[:, t], state)
    outs.append(y_t)
  np.testing.assert_allclose(np.stack(outs, axis=1), full, atol=1e-5, rtol=1e-5)


def test_s4d_bidirectional_does_not_step():
  m = make_s4d(causal=False)
  assert not m.supports_step
  with pytest.raises(ConfigError, match="bidirectional"):
    m.init_state(BATCH)


def test_s4d_ssm_parameter_names():
  m = make_s4d(causal=True)
  names = {str(path[-1]) for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert set(s4d.SSM_PARAMETER_NAMES) <= names
  np.testing.assert_allclose(-np.exp(m.log_A_real[...]), -0.5)
  np.testing.assert_allclose(m.A_imag[0], np.pi * np.arange(STATE), rtol=1e-6)
  fresh = make("s4d", causal=True, state_size=STATE)
  dt = np.exp(fresh.log_dt[...])
  assert (dt >= 0.001 - 1e-7).all() and (dt <= 0.1 + 1e-7).all()


# --- conv: against a numpy convolution ----------------------------------------------------


def numpy_conv(m: conv.ConvMixer, x: np.ndarray, *, causal: bool) -> np.ndarray:
  """Depthwise (cross-correlation, dilated, zero padded) then pointwise, in numpy."""
  k, d = m.kernel_size, m.dilation
  total = (k - 1) * d
  left = total if causal else total // 2
  x = np.asarray(x, np.float64)
  padded = np.pad(x, ((0, 0), (left, total - left), (0, 0)))
  w = np.asarray(m.depthwise.kernel[...], np.float64)[:, 0, :]  # [k, H]
  length = x.shape[1]
  dw = sum(padded[:, j * d : j * d + length] * w[j] for j in range(k))
  dw = dw + np.asarray(m.depthwise.bias[...])
  y = dw @ np.asarray(m.pointwise.kernel[...], np.float64) + np.asarray(m.pointwise.bias[...])
  if m.gated:
    a, b = np.split(y, 2, axis=-1)
    y = a / (1.0 + np.exp(-b))
  return y


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
@pytest.mark.parametrize("kernel_size,dilation", [(3, 2), (2, 3)])
def test_conv_equals_numpy(causal, gated, kernel_size, dilation):
  m = make("conv", causal=causal, gated=gated, kernel_size=kernel_size, dilation=dilation)
  # Non-zero biases so that they are checked too.
  m.depthwise.bias[...] = jnp.linspace(-1, 1, FEATURES)
  m.pointwise.bias[...] = jnp.linspace(-0.5, 0.5, m.pointwise.bias.shape[0])
  x = inputs(2, length=16)
  np.testing.assert_allclose(m(x), numpy_conv(m, x, causal=causal), atol=1e-5, rtol=1e-5)


# --- both: padding, causality, gradients --------------------------------------------------

MIXERS = {
  "conv-causal": lambda: make("conv", causal=True, kernel_size=3, dilation=2, gated=True),
  "conv-centred": lambda: make("conv", causal=False, kernel_size=3, dilation=2),
  "s4d-causal": lambda: make_s4d(causal=True),
  "s4d-bidirectional": lambda: make_s4d(causal=False),
}


@pytest.mark.parametrize("name", MIXERS)
def test_padding_invariance(name):
  m = MIXERS[name]()
  mask = padding_mask()
  x = inputs(3)
  noise = 100.0 * inputs(4)
  y1 = m(x, mask=mask)
  y2 = m(jnp.where(mask[..., None], x, noise), mask=mask)
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  assert not jnp.any(jnp.where(mask[..., None], 0.0, y1))  # padded outputs are zero
  # The mask matters: without it the noise does reach the real tokens.
  y3 = m(jnp.where(mask[..., None], x, noise))
  assert not np.allclose(jnp.where(mask[..., None], y1, 0), jnp.where(mask[..., None], y3, 0))


@pytest.mark.parametrize("name", MIXERS)
def test_causality(name):
  m = MIXERS[name]()
  t0 = 20
  x = inputs(5)
  y1 = m(x)
  y2 = m(x.at[:, t0].add(10.0))
  changed = np.abs(np.asarray(y1 - y2)).max(axis=(0, 2)) > 1e-6
  assert changed[t0]
  if m.causal:
    assert not changed[:t0].any()
  else:
    # Non-causal: earlier outputs see the later input (the conv only within its window).
    assert changed[t0 - 2] and changed[:t0].any()
  if name == "s4d-bidirectional":
    assert changed[:t0].all()


@pytest.mark.parametrize("name", MIXERS)
def test_finite_gradients(name):
  m = MIXERS[name]()
  mask = padding_mask()
  x = inputs(6)

  def loss(m, x):
    return jnp.sum(m(x, mask=mask) ** 2)

  grads, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(m, x)
  leaves = jax.tree.leaves(grads) + [gx]
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
  assert not jnp.any(jnp.where(mask[..., None], 0.0, gx))  # padding gets no gradient


# --- errors -------------------------------------------------------------------------------


def test_s4d_causal_bidirectional_is_config_error():
  with pytest.raises(ConfigError, match="s4d") as info:
    make("s4d", causal=True, bidirectional=True)
  assert "bidirectional" in str(info.value) and "causal" in str(info.value)
  # Explicitly unidirectional but not causal is allowed.
  assert not make("s4d", causal=False, bidirectional=False, state_size=STATE).bidirectional


@pytest.mark.parametrize("name", ["conv", "s4d"])
def test_unknown_kwarg_and_position_are_config_errors(name):
  with pytest.raises(ConfigError, match="window"):
    make(name, causal=False, window=4)
  with pytest.raises(ConfigError, match=name):
    make(name, causal=False, position="rope")


@pytest.mark.parametrize(
  "name,kwargs",
  [
    ("conv", {"kernel_size": 0}),
    ("conv", {"dilation": 1.5}),
    ("s4d", {"state_size": 0}),
    ("s4d", {"dt_min": 0.2, "dt_max": 0.1}),
  ],
)
def test_bad_values_are_config_errors(name, kwargs):
  with pytest.raises(ConfigError, match=next(iter(kwargs))):
    make(name, causal=False, **kwargs)


# --- memory -------------------------------------------------------------------------------


def test_s4d_compiled_memory_is_linear_in_length():
  m = make("s4d", causal=False, state_size=STATE)
  graphdef, params = nnx.split(m)

  def train_step(params, x):
    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

    return jax.grad(loss)(params)

  temp = {}
  for length in (256, 512, 1024, 2048):
    x = jax.ShapeDtypeStruct((BATCH, length, FEATURES), jnp.float32)
    compiled = jax.jit(train_step).lower(params, x).compile()
    temp[length] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[256] > 0
  assert temp[256] < temp[512] < temp[1024] < temp[2048], temp
  # Quadratic would give ~4.
  assert temp[2048] / temp[1024] < 2.6, temp


def test_s4d_never_forms_the_vandermonde_matrix():
  """Forward + backward of a wide S4D at L = 4096 holds less than one [H, N, L] complex array
  (the naive kernel would hold several)."""
  h, n, length = 64, 64, 4096
  m = registry.make(
    "s4d", in_features=h, num_heads=1, head_dim=h, causal=True, rngs=nnx.Rngs(0), state_size=n
  )
  graphdef, params = nnx.split(m)

  def grad(params, x):
    return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)

  x = jax.ShapeDtypeStruct((1, length, h), jnp.float32)
  temp = jax.jit(grad).lower(params, x).compile().memory_analysis().temp_size_in_bytes
  assert temp < h * n * length * 8, temp
