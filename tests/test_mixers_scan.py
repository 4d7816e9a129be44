"""The LRU and S5 mixers and their parallel linear recurrence, against Python loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.mixers import registry, scan

NAMES = ("lru", "s5")
FEATURES, STATE, LENGTH = 8, 4, 16


def make(name, *, causal=False, bidirectional=None, seed=0, **kwargs):
  if bidirectional is not None:
    kwargs["bidirectional"] = bidirectional
  return registry.make(
    name,
    in_features=FEATURES,
    num_heads=2,
    head_dim=4,
    causal=causal,
    rngs=nnx.Rngs(seed),
    **{"state_size": STATE, **kwargs},
  )


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, mask):
  return nnx.merge(graphdef, state)(x, mask=mask)


def run(m, x, mask=None):
  """m(x, mask=mask), compiled once per mixer configuration and shape (eager dispatch of
  the scan's many small ops is slower than compiling it)."""
  graphdef, state = nnx.split(m)
  return _apply(graphdef, state, x, None if mask is None else jnp.asarray(mask))


def inputs(seed=1, length=LENGTH, batch=2):
  return jax.random.normal(jax.random.key(seed), (batch, length, FEATURES))


def _np(p):
  return np.asarray(p[...], np.float64)


def reference(m, x):
  """The recurrence written from the papers' equations, one token at a time (float64)."""
  if isinstance(m, scan.LRUMixer):
    lam = np.exp(-np.exp(_np(m.nu_log)) + 1j * np.exp(_np(m.theta_log)))
    b_bar = np.exp(_np(m.gamma_log))[:, None] * (_np(m.B_re) + 1j * _np(m.B_im))
  else:
    lam_c = np.minimum(_np(m.Lambda_re), -1e-4) + 1j * _np(m.Lambda_im)
    lam = np.exp(lam_c * np.exp(_np(m.log_step)))
    b_bar = ((lam - 1) / lam_c)[:, None] * (_np(m.B_re) + 1j * _np(m.B_im))
  x = np.asarray(x, np.float64)
  batch, length, _ = x.shape
  y = x * _np(m.D)
  directions = [(range(length), _np(m.C_re) + 1j * _np(m.C_im))]
  if m.bidirectional:
    c_back = _np(m.C_backward_re) + 1j * _np(m.C_backward_im)
    directions.append((reversed(range(length)), c_back))
  for order, c in directions:
    h = np.zeros((batch, STATE), complex)
    for t in order:
      h = lam * h + x[:, t] @ b_bar.T
      y[:, t] += np.real(h @ c.T)
  return y


# 1. The scan itself.


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_recurrence_equals_loop(complex_, reverse):
  rng = np.random.default_rng(0)
  shape = (2, 32, 3)
  a = rng.uniform(-1, 1, shape)
  b = rng.standard_normal(shape)
  if complex_:
    a = a * np.exp(1j * rng.uniform(0, 2 * np.pi, shape))
    b = b + 1j * rng.standard_normal(shape)
  dtype = np.complex64 if complex_ else np.float32
  a, b = a.astype(dtype), b.astype(dtype)
  expected = np.zeros_like(b)
  h = np.zeros_like(b[:, 0])
  for t in reversed(range(shape[1])) if reverse else range(shape[1]):
    h = a[:, t] * h + b[:, t]
    expected[:, t] = h
  recurrence = jax.jit(functools.partial(scan.linear_recurrence, reverse=reverse))
  got = recurrence(jnp.asarray(a), jnp.asarray(b))
  assert got.dtype == expected.dtype
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_linear_recurrence_broadcasts_a():
  b = jax.random.normal(jax.random.key(0), (2, 8, 3))
  a = jnp.array([0.5, -0.9, 0.1])
  full = scan.linear_recurrence(jnp.broadcast_to(a, b.shape), b)
  np.testing.assert_allclose(scan.linear_recurrence(a, b), full, rtol=1e-6)


# 2. Full forward against the equations.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_equals_reference_loop(name, causal):
  m = make(name, causal=causal)
  assert m.bidirectional == (not causal)
  x = inputs()
  np.testing.assert_allclose(run(m, x), reference(m, x), rtol=2e-4, atol=2e-4)


def test_init_follows_the_papers():
  lru = make("lru", r_min=0.5, r_max=0.9, state_size=64)
  radius = np.exp(-np.exp(_np(lru.nu_log)))
  assert np.all((radius >= 0.5 - 1e-5) & (radius <= 0.9 + 1e-5))
  np.testing.assert_allclose(np.exp(_np(lru.gamma_log)), np.sqrt(1 - radius**2), rtol=1e-5)
  assert np.all(np.exp(_np(lru.theta_log)) <= 2 * math.pi)
  s5 = make("s5", state_size=16)
  np.testing.assert_allclose(_np(s5.Lambda_re), -0.5)
  im = np.sort(_np(s5.Lambda_im))
  np.testing.assert_allclose(im, -im[::-1], atol=1e-4)  # a real skew matrix's +-i w pairs
  assert np.all(np.abs(im) > 0.1)
  step = np.exp(_np(s5.log_step))
  assert np.all((step >= 0.001 - 1e-7) & (step <= 0.1 + 1e-7))


def test_ssm_parameter_names_are_the_modules_parameters():
  found = set()
  for name in NAMES:
    state = nnx.state(make(name), nnx.Param)
    found |= {str(path[-1]) for path, _ in nnx.to_flat_state(state)}
  assert set(scan.SSM_PARAMETER_NAMES) <= found


# 3. Recurrent decoding.


@pytest.mark.parametrize("name", NAMES)
def test_step_equals_causal_forward(name):
  m = make(name, causal=True)
  assert m.supports_step
  x = inputs(length=12)
  state = m.init_state(2)
  assert state.shape == (2, STATE) and jnp.iscomplexobj(state)
  ys = []
  for t in range(x.shape[1]):
    y_t, state = m.step(x[:, t], state)
    ys.append(y_t)
  np.testing.assert_allclose(jnp.stack(ys, 1), run(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bidirectional_form_refuses_to_step(name):
  m = make(name)
  assert not m.supports_step
  with pytest.raises(ConfigError, match="bidirectional"):
    m.init_state(2)


# 4. Padding.


def _masks():
  right = np.ones((2, LENGTH), bool)
  right[0, 11:] = False
  right[1, 6:] = False
  middle = np.ones((2, LENGTH), bool)
  middle[:, 5] = False
  middle[1, 9] = False
  return {"right": right, "middle": middle}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", ["right", "middle"])
def test_padding_never_reaches_real_outputs(name, causal, padding):
  m = make(name, causal=causal)
  mask = _masks()[padding]
  x = inputs()
  junk = jnp.where(mask[:, :, None], x, 100.0 * inputs(seed=7))
  y, y_junk = run(m, x, mask), run(m, junk, mask)
  np.testing.assert_allclose(y, y_junk, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(y)[~mask] == 0)
  # The state carries through padding unchanged: each row equals its real tokens alone.
  for row in range(2):
    alone = run(m, x[row : row + 1, mask[row]])
    np.testing.assert_allclose(y[row, mask[row]], alone[0], rtol=1e-4, atol=1e-5)
  # And the mask matters (so this test can fail): without it the junk does reach them
  # (except causal with right padding, where the junk comes after every real token).
  if not (causal and padding == "right"):
    assert not np.allclose(run(m, x)[mask], run(m, junk)[mask], atol=1e-3)


# 5. Causality.


@pytest.mark.parametrize("name", NAMES)
def test_causal_form_ignores_the_future_and_bidirectional_does_not(name):
  x = inputs()
  future = x.at[:, 9:].set(inputs(seed=3)[:, 9:])
  causal = make(name, causal=True)
  np.testing.assert_allclose(
    run(causal, x)[:, :9], run(causal, future)[:, :9], rtol=1e-6, atol=1e-6
  )
  assert not np.allclose(run(causal, x)[:, 9:], run(causal, future)[:, 9:], atol=1e-4)
  both = make(name)
  assert not np.allclose(run(both, x)[:, :9], run(both, future)[:, :9], atol=1e-4)


# 6. Gradients.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_are_finite(name, causal):
  m = make(name, causal=causal)
  x = inputs()
  mask = jnp.asarray(_masks()["middle"])
  graphdef, params = nnx.split(m)
  loss = lambda params: jnp.sum(nnx.merge(graphdef, params)(x, mask=mask) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in nnx.to_flat_state(grads):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path


# 7. Errors.


@pytest.mark.parametrize("name", NAMES)
def test_errors_name_what_to_fix(name):
  with pytest.raises(ConfigError, match=f"(?s){name}.*bidirectional"):
    make(name, causal=True, bidirectional=True)
  with pytest.raises(ConfigError, match="bogus"):
    make(name, bogus=1)
  with pytest.raises(ConfigError, match="position"):
    make(name, position="rope")
  with pytest.raises(ConfigError, match="state_size"):
    make(name, state_size=0)
  make(name, causal=False, bidirectional=False)  # a unidirectional encoder is fine


# 8. Memory.


def _train_temp_bytes(name, length):
  graphdef, params, rest = nnx.split(make(name), nnx.Param, ...)

  def loss(params, x, mask):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x, mask=mask) ** 2)

  x = jax.ShapeDtypeStruct((1, length, FEATURES), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  compiled = jax.jit(jax.grad(loss)).lower(params, x, mask).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.spread  # compiling 3 lengths is the slow part: let the other worker share it
@pytest.mark.parametrize("name", NAMES)
def test_compiled_memory_is_linear_in_length(name):
  temp = {n: _train_temp_bytes(name, n) for n in (512, 1024, 2048)}
  assert temp[1024] / temp[512] < 2.6, temp
  assert temp[2048] / temp[1024] < 2.6, temp
