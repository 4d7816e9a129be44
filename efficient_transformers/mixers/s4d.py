"""S4D: a diagonal state-space mixer, applied by FFT convolution or one step at a time.

Gu, Gupta, Goel and Ré, "On the Parameterization and Initialization of Diagonal
State Space Models" (2022), as in the authors' minimal `s4d.py` (state-spaces
repo). Per channel h (H = in_features channels, each its own SSM) and mode n
(N = state_size modes):

  A = -exp(log_A_real) + i * A_imag       S4D-Lin init: A_real = -1/2, A_imag = pi * n
  dt = exp(log_dt)                        log_dt ~ U[log dt_min, log dt_max]
  dA = exp(dt * A), dB = (dA - 1) / A * B (zero-order hold; B = 1, C absorbs it)
  K[l] = 2 * Re(sum_n C_n dB_n dA_n^l)    l = 0 .. L-1 (a Vandermonde product)
  y = K * x + D x                         (causal convolution, by FFT of length 2L)

The factor 2: each complex mode stands for a conjugate pair (A_n, conj A_n) of
a real SSM, whose two terms sum to 2 * Re(.). So `state_size` counts complex
modes, the equivalent real state has 2 * state_size entries, and the reference's
`d_state=64` (which keeps d_state / 2 modes) is `state_size=32` here.

After the SSM: GELU, then a GLU output layer (Linear to 2H, a * sigmoid(b)), as
in the reference's `output_linear`.

Bidirectional (the S4 repo's `bidirectional` flag, its FFTConv): two kernels
from the same A and dt and two C's; the forward one is causal (lags 0 .. L-1),
the backward one runs over the reversed sequence with lags 1 .. L-1 (so the
present token is counted once, by the forward kernel and D):
  y[t] = sum_{s<=t} K_fwd[t-s] x[s] + sum_{s>t} K_bwd[s-t-1] x[s] + D x[t].
Both are one circular convolution of length 2L with the kernel
[K_fwd, reversed K_bwd].

`bidirectional` defaults to `not causal`. causal=True with an explicit
bidirectional=True is a ConfigError (a backward kernel reads later tokens).

Padding: the input is zeroed at masked positions (and the output zeroed there).
A zero input adds nothing to a linear convolution, so whatever the padded
values were, real outputs are unchanged, wherever the padding is and in either
direction; in causal mode right padding is moreover after every real token.
A padding gap between real tokens still counts as elapsed time (the state
decays across it).

Decoding (unidirectional only): `init_state(batch_size)` is complex zeros
[batch, H, N]; `step(x_t, state)`: state = dA * state + dB * x_t,
y = 2 * Re(sum_n C_n state_n) + D x_t, then GELU and the GLU layer; equal to the
FFT forward token by token.

Cost: O(H * N * L) for the kernel and O(B * H * L log L) for the FFT; memory
linear in L, with no [H, N, L] array (`ssm_kernel` factors the Vandermonde
product into blocks of about sqrt(L) lags).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.mixers import registry
from efficient_transformers.mixers.base import SequenceMixer

# The SSM's Lambda (A) and Delta (dt) parameters: the reference trains them with a smaller
# learning rate and no weight decay, so an optimizer group finds them by these names.
SSM_PARAMETER_NAMES = ("log_dt", "log_A_real", "A_imag")

_F32 = jnp.float32


def discretize(
  log_dt: jax.Array, log_A_real: jax.Array, A_imag: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Zero-order hold with B = 1.

  Args:
    log_dt: [H].
    log_A_real, A_imag: [H, N].

  Returns:
    (dt * A, dA, dB), each complex [H, N].
  """
  A = -jnp.exp(log_A_real.astype(_F32)) + 1j * A_imag.astype(_F32)
  dt_A = jnp.exp(log_dt.astype(_F32))[:, None] * A
  dA = jnp.exp(dt_A)
  return dt_A, dA, (dA - 1.0) / A


def ssm_kernel(C: jax.Array, dt_A: jax.Array, dB: jax.Array, length: int) -> jax.Array:
  """K[c, h, l] = 2 * Re(sum_n C[c, h, n] dB[h, n] dA[h, n]^l), by a Vandermonde product.

  Args:
    C: complex [channels, H, N].
    dt_A, dB: complex [H, N] (dA = exp(dt_A), so dA^l = exp(l * dt_A)).
    length: L.

  Returns:
    float32 [channels, H, L].

  The [H, N, L] Vandermonde matrix is never formed: with l = b * T + t (T about
  sqrt(L)), dA^l = dA^(bT) dA^t, so K[c, h, bT + t] = sum_n W[c, h, n, b] V[h, n, t]
  with W = C dB dA^(bT) [.., N, L / T] and V = dA^t [H, N, T]: one batched matmul,
  the same O(H N L) work, with inputs of O(H N sqrt(L)) and the output [c, H, L].
  """
  block = max(1, math.isqrt(length))
  blocks = -(-length // block)
  inner = jnp.exp(dt_A[..., None] * jnp.arange(block, dtype=_F32))  # [H, N, T]
  outer = jnp.exp(dt_A[..., None] * (block * jnp.arange(blocks, dtype=_F32)))  # [H, N, L/T]
  weights = (C * dB)[..., None] * outer  # [channels, H, N, L/T]
  # Re(w v) = Re w Re v - Im w Im v: the real part alone, without a complex product.
  kernel = jnp.einsum("chnb,hnt->chbt", weights.real, inner.real) - jnp.einsum(
    "chnb,hnt->chbt", weights.imag, inner.imag
  )
  kernel = kernel.reshape(*kernel.shape[:2], blocks * block)[..., :length]
  return 2.0 * kernel


def fft_convolution(x: jax.Array, kernel: jax.Array, bidirectional: bool) -> jax.Array:
  """The SSM's convolution by FFT of length 2L (no wrap-around).

  Args:
    x: [batch, L, H].
    kernel: [1, H, L] (causal), or [2, H, L] (forward, backward) when bidirectional.

  Returns:
    float32 [batch, L, H]: sum_{s<=t} K_fwd[t-s] x[s] (+ sum_{s>t} K_bwd[s-t-1] x[s]).
  """
  length = x.shape[1]
  k = kernel[0]
  if bidirectional:
    # Circular index 2L - 1 - j is lag -(j + 1): the backward kernel, reversed, on the right.
    k = jnp.concatenate([k, kernel[1][:, ::-1]], axis=-1)  # [H, 2L]
  k_f = jnp.fft.rfft(k, n=2 * length, axis=-1).T  # [L + 1, H]
  x_f = jnp.fft.rfft(x.astype(_F32), n=2 * length, axis=1)  # [batch, L + 1, H]
  return jnp.fft.irfft(x_f * k_f, n=2 * length, axis=1)[:, :length]


@registry.register("s4d")
class S4DMixer(SequenceMixer):
  """Diagonal state-space mixer (S4D-Lin), causal or bidirectional.

  Args (beyond the common ones of `SequenceMixer`):
    state_size: N, complex modes per channel (each a conjugate pair: 2N real states).
    dt_min, dt_max: range of the initial step size dt (log-uniform).
    bidirectional: add a backward kernel over the reversed sequence; None (the default)
      means `not causal`; True with causal=True is a ConfigError.
  """

  supports_causal = True
  # Unidirectional instances only: __init__ sets it per instance.
  supports_step = True

  def __init__(
    self,
    *,
    state_size: int = 64,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    bidirectional: bool | None = None,
    **common,
  ):
    super().__init__(**common)
    in_features, rngs = self.in_features, common["rngs"]
    dtype, param_dtype = self.dtype, self.param_dtype
    self.check_positive_int("state_size", state_size)
    if not (0 < dt_min <= dt_max):
      raise ConfigError(
        f"mixer 's4d': need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}.",
        argument="attention_kwargs.dt_min",
      )
    self.state_size = state_size
    self.bidirectional = self.resolve_bidirectional(bidirectional)
    self.supports_step = not self.bidirectional
    h, n = in_features, state_size
    channels = 2 if self.bidirectional else 1

    key = rngs.params()
    k_dt, k_c, k_d = jax.random.split(key, 3)
    self.log_dt = nnx.Param(
      jax.random.uniform(k_dt, (h,), param_dtype, minval=math.log(dt_min), maxval=math.log(dt_max))
    )
    self.log_A_real = nnx.Param(jnp.full((h, n), math.log(0.5), param_dtype))
    self.A_imag = nnx.Param(jnp.broadcast_to(math.pi * jnp.arange(n, dtype=param_dtype), (h, n)))
    # Complex C as (real, imag) in the last axis, each N(0, 1/2): a standard complex normal.
    self.C = nnx.Param(jax.random.normal(k_c, (channels, h, n, 2), param_dtype) * math.sqrt(0.5))
    self.D = nnx.Param(jax.random.normal(k_d, (h,), param_dtype))
    self.output_linear = nnx.Linear(h, 2 * h, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def _complex_C(self) -> jax.Array:
    c = self.C[...].astype(_F32)
    return c[..., 0] + 1j * c[..., 1]  # [channels, H, N]

  def ssm(self, x: jax.Array) -> jax.Array:
    """The linear SSM alone: x [batch, L, H] -> float32 [batch, L, H] (K * x + D x)."""
    dt_A, _, dB = discretize(self.log_dt[...], self.log_A_real[...], self.A_imag[...])
    kernel = ssm_kernel(self._complex_C(), dt_A, dB, x.shape[1])
    y = fft_convolution(x, kernel, self.bidirectional)
    return y + self.D[...].astype(_F32) * x.astype(_F32)

  def _output(self, y: jax.Array, x_dtype) -> jax.Array:
    """GELU then the GLU output layer (the reference's activation and output_linear)."""
    y = jax.nn.gelu(y).astype(self.dtype or x_dtype)
    a, b = jnp.split(self.output_linear(y), 2, axis=-1)
    return (a * jax.nn.sigmoid(b)).astype(x_dtype)

  def mix(self, x: jax.Array, *, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """x [batch, length, in_features] -> [batch, length, in_features]."""
    del deterministic
    if mask is not None:
      x = jnp.where(mask[..., None], x, 0)
    y = self._output(self.ssm(x), x.dtype)
    if mask is not None:
      y = jnp.where(mask[..., None], y, 0)
    return y

  def _check_step(self) -> None:
    if self.bidirectional:
      raise ConfigError(
        "mixer 's4d' decodes token by token only when unidirectional (bidirectional=True "
        "reads the whole sequence); set causal=True.",
        argument="attention_kwargs.bidirectional",
      )

  def init_state(self, batch_size: int) -> jax.Array:
    """Complex zeros [batch, H, N]: the SSM's state before the first token."""
    self._check_step()
    return jnp.zeros((batch_size, self.in_features, self.state_size), jnp.complex64)

  def step(self, x_t: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token: x_t [batch, in_features] -> (y_t [batch, in_features], new state).

    No dropout here: `step` is for decoding, where the model is deterministic.
    """
    self._check_step()
    _, dA, dB = discretize(self.log_dt[...], self.log_A_real[...], self.A_imag[...])
    x32 = x_t.astype(_F32)
    state = dA * state + dB * x32[..., None]
    y = 2.0 * jnp.einsum("hn,bhn->bh", self._complex_C()[0], state).real
    y = y + self.D[...].astype(_F32) * x32
    return self._output(y, x_t.dtype), state
