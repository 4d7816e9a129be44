"""Diagonal linear recurrences run by a parallel scan: the LRU and S5 mixers.

Both mixers are a diagonal complex linear recurrence over a state of size N,

    h_t = lam_bar * h_{t-1} + B_bar x_t,    y_t = Re(C h_t) + D * x_t,

computed for the whole sequence at once by `linear_recurrence`
(`jax.lax.associative_scan`, O(L log L) work, O(L) memory with autodiff,
depth O(log L)). They differ in how lam_bar and B_bar come from parameters:

- `lru` (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
  Sequences"): lam = exp(-exp(nu_log) + i exp(theta_log)) sampled uniformly on
  the ring r_min <= |lam| <= r_max, phase in [0, max_phase]; B_bar =
  exp(gamma_log) * B with gamma = sqrt(1 - |lam|^2) at init (the paper's
  normalization); B, C complex with the appendix's init (std 1/sqrt(2H) per
  part for B, 1/sqrt(N) for C), D ~ N(0, 1).
- `s5` (Smith, Warrington, Linderman 2023, "Simplified State Space Layers for
  Sequence Modeling"): continuous Lambda = Lambda_re + i Lambda_im initialized
  from the diagonalized HiPPO-LegS normal matrix (Lambda_re = -1/2, Lambda_im =
  its eigenvalues; B = V^-1 B0, C = C0 V with V its eigenvectors), a learned
  per-state step Delta = exp(log_step), log_step ~ U[log 0.001, log 0.1], and
  zero-order hold: lam_bar = exp(Lambda Delta), B_bar = (lam_bar - 1) / Lambda B.
  One HiPPO block of size P, and no conjugate-symmetry halving: all P complex
  states are kept and y takes the real part. Lambda_re is clipped to <= -1e-4
  in the forward pass so the recurrence stays stable.

Bidirectional (the default for non-causal use, `bidirectional=None` meaning
`not causal`): a second recurrence runs over the reversed sequence with the
same lam_bar and B_bar (as S5's bidirectional layer does) and its own output
matrix C_backward; the two are summed, y = Re(C h_fwd + C_backward h_bwd) + D x,
i.e. the concatenated states [h_fwd, h_bwd] projected by [C, C_backward].
causal=True with bidirectional=True is a ConfigError. Only the unidirectional
form decodes token by token (`init_state`, `step`).

Padding: where mask is False the state is not updated (a_t = 1, b_t = 0, so h
carries through unchanged in either direction) and the output is zero, so with
left, right or interior padding no padded input reaches a real output.

The recurrence runs in float32 / complex64 whatever `dtype` is; the output is
cast back to `dtype` (or x's dtype).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.mixers.base import SequenceMixer
from efficient_transformers.mixers.registry import register

# The parameters that set the recurrence's dynamics, for an optimizer group
# (both papers train them with a smaller learning rate and no weight decay).
SSM_PARAMETER_NAMES = ("nu_log", "theta_log", "gamma_log", "Lambda_re", "Lambda_im", "log_step")

_F32 = jnp.float32


def linear_recurrence(a: jax.Array, b: jax.Array, *, reverse: bool = False) -> jax.Array:
  """h_t = a_t * h_{t-1} + b_t with h_{-1} = 0, over axis 1, by a parallel scan.

  Args:
    a: [batch, length, ...] (or anything broadcastable to b's shape), real or complex.
    b: [batch, length, ...].
    reverse: run from the last position to the first (h_t = a_t h_{t+1} + b_t).

  Returns:
    h: [batch, length, ...], b's shape, in the promoted dtype of a and b.
  """
  dtype = jnp.result_type(a, b)
  a = jnp.broadcast_to(a, b.shape).astype(dtype)
  b = b.astype(dtype)

  def combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2

  # reverse=True scans the time-flipped sequence (and flips the result back), so the
  # same op gives h_t = a_t h_{t+1} + b_t.
  _, h = jax.lax.associative_scan(combine, (a, b), reverse=reverse, axis=1)
  return h


class _DiagonalRecurrence(SequenceMixer):
  """The shared forward pass, padding rule, bidirectional form and decoding.

  Subclasses set B_re, B_im [N, H], C_re, C_im [H, N], D [H] (and C_backward_re,
  C_backward_im when bidirectional) and implement `discretize`.
  """

  supports_step = True  # the unidirectional form; an instance says so for itself

  def _setup(self, *, state_size: int, bidirectional: bool | None) -> None:
    self.check_positive_int("state_size", state_size)
    self.state_size = state_size
    self.bidirectional = self.resolve_bidirectional(bidirectional)
    self.supports_step = not self.bidirectional

  def _output_params(self, key: jax.Array, std: float, basis: jax.Array | None = None) -> None:
    """C (and C_backward) [H, N] = C0 @ basis, C0 complex with each part ~ N(0, std^2)."""
    h, n = self.in_features, self.state_size

    def make(k):
      k_re, k_im = jax.random.split(k)
      c = std * jax.lax.complex(
        jax.random.normal(k_re, (h, n), _F32), jax.random.normal(k_im, (h, n), _F32)
      )
      if basis is not None:
        c = c @ basis
      pdt = self.param_dtype
      return nnx.Param(jnp.real(c).astype(pdt)), nnx.Param(jnp.imag(c).astype(pdt))

    k_forward, k_backward = jax.random.split(key)
    self.C_re, self.C_im = make(k_forward)
    if self.bidirectional:
      self.C_backward_re, self.C_backward_im = make(k_backward)

  def discretize(self) -> tuple[jax.Array, jax.Array]:
    """(lam_bar [N] complex64, B_bar [N, H] complex64) of h_t = lam_bar h_{t-1} + B_bar x_t."""
    raise NotImplementedError

  def _project(self, h: jax.Array, c_re, c_im) -> jax.Array:
    """Re(C h): [..., N] complex -> [..., H]."""
    c_re, c_im = c_re[...].astype(_F32), c_im[...].astype(_F32)
    return jnp.real(h) @ c_re.T - jnp.imag(h) @ c_im.T

  def mix(self, x: jax.Array, *, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """[batch, length, H] -> [batch, length, H]; padding (mask False) neither updates the
    state nor gets an output."""
    del deterministic
    out_dtype = self.dtype or x.dtype
    xf = x.astype(_F32)
    lam_bar, b_bar = self.discretize()
    if mask is not None:
      real = mask[:, :, None]
      xf = jnp.where(real, xf, 0.0)
    bx = jax.lax.complex(xf @ jnp.real(b_bar).T, xf @ jnp.imag(b_bar).T)  # [B, L, N]
    a = jnp.broadcast_to(lam_bar, bx.shape)
    if mask is not None:
      a = jnp.where(real, a, jnp.ones((), a.dtype))
      bx = jnp.where(real, bx, jnp.zeros((), bx.dtype))
    if self.bidirectional:
      # One scan over [forward states, time-flipped backward states]: half the compiled
      # graph of two scans, the same result as linear_recurrence(..., reverse=True).
      n = self.state_size
      flip = lambda v: jnp.flip(v, axis=1)
      h = linear_recurrence(jnp.concatenate([a, flip(a)], -1), jnp.concatenate([bx, flip(bx)], -1))
      y = self._project(h[..., :n], self.C_re, self.C_im)
      y = y + self._project(flip(h[..., n:]), self.C_backward_re, self.C_backward_im)
    else:
      y = self._project(linear_recurrence(a, bx), self.C_re, self.C_im)
    y = y + xf * self.D[...].astype(_F32)
    if mask is not None:
      y = jnp.where(real, y, 0.0)
    return y.astype(out_dtype)

  def _check_step(self) -> None:
    if self.bidirectional:
      raise ConfigError(
        f"mixer {self.registered_name!r} decodes token by token only in its unidirectional "
        "form; build it with causal=True (or bidirectional=False).",
        argument="attention_kwargs.bidirectional",
      )

  def init_state(self, batch_size: int) -> jax.Array:
    """The empty recurrent state: [batch, N] complex64 zeros."""
    self._check_step()
    return jnp.zeros((batch_size, self.state_size), jnp.complex64)

  def step(self, x_t: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token: x_t [batch, H], state [batch, N] -> (y_t [batch, H], new state)."""
    self._check_step()
    xf = x_t.astype(_F32)
    lam_bar, b_bar = self.discretize()
    bx = jax.lax.complex(xf @ jnp.real(b_bar).T, xf @ jnp.imag(b_bar).T)
    state = lam_bar * state + bx
    y = self._project(state, self.C_re, self.C_im) + xf * self.D[...].astype(_F32)
    return y.astype(self.dtype or x_t.dtype), state


@register("lru")
class LRUMixer(_DiagonalRecurrence):
  """The Linear Recurrent Unit (Orvieto et al. 2023), one per block, width H = in_features.

  Args (beyond SequenceMixer's):
    state_size: N, the number of complex states.
    r_min, r_max: the ring 0 <= r_min < r_max <= 1 that |lam| is sampled on.
    max_phase: arg(lam) is sampled in [0, max_phase].
    bidirectional: add a backward recurrence; None means `not causal`.
  """

  def __init__(
    self,
    *,
    state_size: int = 64,
    r_min: float = 0.0,
    r_max: float = 1.0,
    max_phase: float = 2 * math.pi,
    bidirectional: bool | None = None,
    rngs: nnx.Rngs,
    **common,
  ):
    super().__init__(rngs=rngs, **common)
    self._setup(state_size=state_size, bidirectional=bidirectional)
    if not 0.0 <= r_min < r_max <= 1.0:
      raise ConfigError(
        f"mixer 'lru' needs 0 <= r_min < r_max <= 1, got r_min={r_min!r}, r_max={r_max!r}.",
        argument="attention_kwargs.r_min",
      )
    if not max_phase > 0:
      raise ConfigError(
        f"mixer 'lru' needs max_phase > 0, got {max_phase!r}.",
        argument="attention_kwargs.max_phase",
      )
    n, h = state_size, self.in_features
    k_u1, k_u2, k_b_re, k_b_im, k_c, k_d = jax.random.split(rngs.params(), 6)
    # Uniform on the ring: |lam|^2 uniform in [r_min^2, r_max^2]; kept off 0 and 1 so
    # nu_log and gamma_log are finite.
    u1 = jax.random.uniform(k_u1, (n,), _F32)
    radius_sq = jnp.clip(u1 * (r_max**2 - r_min**2) + r_min**2, 1e-6, 1.0 - 1e-6)
    nu_log = jnp.log(-0.5 * jnp.log(radius_sq))
    u2 = jax.random.uniform(k_u2, (n,), _F32, minval=1e-6)
    theta_log = jnp.log(max_phase * u2)
    gamma_log = jnp.log(jnp.sqrt(1.0 - radius_sq))  # |lam| = exp(-exp(nu_log)) = sqrt(r^2)
    pdt = self.param_dtype
    self.nu_log = nnx.Param(nu_log.astype(pdt))
    self.theta_log = nnx.Param(theta_log.astype(pdt))
    self.gamma_log = nnx.Param(gamma_log.astype(pdt))
    b_std = 1.0 / math.sqrt(2 * h)
    self.B_re = nnx.Param((b_std * jax.random.normal(k_b_re, (n, h), _F32)).astype(pdt))
    self.B_im = nnx.Param((b_std * jax.random.normal(k_b_im, (n, h), _F32)).astype(pdt))
    self._output_params(k_c, 1.0 / math.sqrt(n))
    self.D = nnx.Param(jax.random.normal(k_d, (h,), _F32).astype(pdt))

  def discretize(self) -> tuple[jax.Array, jax.Array]:
    nu, theta = self.nu_log[...].astype(_F32), self.theta_log[...].astype(_F32)
    lam = jnp.exp(jax.lax.complex(-jnp.exp(nu), jnp.exp(theta)))
    gamma = jnp.exp(self.gamma_log[...].astype(_F32))[:, None]
    b = jax.lax.complex(self.B_re[...].astype(_F32), self.B_im[...].astype(_F32))
    return lam, gamma * b


def hippo_legs_diagonal(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Eigenvalues [n] and eigenvectors [n, n] of HiPPO-LegS's normal part (S5's init).

  A = HiPPO-LegS, P = sqrt(k + 1/2): S = A + P P^T = -I/2 + skew-symmetric, so its
  eigenvalues are -1/2 + i w with w the eigenvalues of the Hermitian -i (S + I/2).
  """
  k = np.arange(n)
  p = np.sqrt(1 + 2 * k)
  legs = -(np.tril(p[:, None] * p[None, :]) - np.diag(k))
  half = np.sqrt(k + 0.5)
  s = legs + half[:, None] * half[None, :]
  w, v = np.linalg.eigh(s * -1j)
  return np.mean(np.diagonal(s)) + 1j * w, v


@register("s5")
class S5Mixer(_DiagonalRecurrence):
  """The S5 layer (Smith, Warrington, Linderman 2023): one MIMO diagonal SSM over all H
  features, state size P, HiPPO-LegS init and zero-order-hold discretization.

  Args (beyond SequenceMixer's):
    state_size: P, the number of complex states.
    dt_min, dt_max: log_step is initialized uniformly in [log dt_min, log dt_max].
    bidirectional: add a backward recurrence; None means `not causal`.
  """

  def __init__(
    self,
    *,
    state_size: int = 64,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    bidirectional: bool | None = None,
    rngs: nnx.Rngs,
    **common,
  ):
    super().__init__(rngs=rngs, **common)
    self._setup(state_size=state_size, bidirectional=bidirectional)
    if not 0.0 < dt_min <= dt_max:
      raise ConfigError(
        f"mixer 's5' needs 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}.",
        argument="attention_kwargs.dt_min",
      )
    p, h = state_size, self.in_features
    lam, v = hippo_legs_diagonal(p)
    v = jnp.asarray(v, jnp.complex64)
    k_step, k_b, k_c, k_d = jax.random.split(rngs.params(), 4)
    pdt = self.param_dtype
    self.Lambda_re = nnx.Param(jnp.asarray(lam.real, pdt))
    self.Lambda_im = nnx.Param(jnp.asarray(lam.imag, pdt))
    log_step = jax.random.uniform(
      k_step, (p,), _F32, minval=math.log(dt_min), maxval=math.log(dt_max)
    )
    self.log_step = nnx.Param(log_step.astype(pdt))
    # B = V^-1 B0 (V is unitary: V^-1 = V^H), B0 LeCun-normal over the H inputs.
    b = v.conj().T @ (jax.random.normal(k_b, (p, h), _F32) / math.sqrt(h))
    self.B_re, self.B_im = nnx.Param(b.real.astype(pdt)), nnx.Param(b.imag.astype(pdt))
    # C = C0 V, C0 complex, each part with std 1/sqrt(P) (S5's LeCun-normal over P).
    self._output_params(k_c, 1.0 / math.sqrt(p), basis=v)
    self.D = nnx.Param(jax.random.normal(k_d, (h,), _F32).astype(pdt))

  def discretize(self) -> tuple[jax.Array, jax.Array]:
    lam = jax.lax.complex(
      jnp.minimum(self.Lambda_re[...].astype(_F32), -1e-4), self.Lambda_im[...].astype(_F32)
    )
    step = jnp.exp(self.log_step[...].astype(_F32))
    lam_bar = jnp.exp(lam * step)
    b = jax.lax.complex(self.B_re[...].astype(_F32), self.B_im[...].astype(_F32))
    return lam_bar, ((lam_bar - 1.0) / lam)[:, None] * b
