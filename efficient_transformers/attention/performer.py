"""Performer: FAVOR+ random-feature attention, O(L m d) time and O(L m) memory.

Choromanski et al., "Rethinking Attention with Performers" (ICLR 2021).
Random features w_1..w_m turn queries and keys into positive feature vectors
with E[phi(q)^T phi(k)] = exp(q^T k / sqrt(d)), so softmax attention is
approximated by linear attention over those features (the shared core in
linear.py: padded keys excluded, causal via chunked prefix sums, never an
[L, L] array).

Kernels:
  softmax: phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(m), x' = x d^-1/4 (FAVOR+).
  relu:    phi(x) = relu(w^T x) / sqrt(m) + 1e-3, as in the LRA Performer
           (the constant, from the reference code, keeps denominators positive).

Numerical stabilizers of the softmax kernel. Any factor that multiplies every
feature of one query row cancels between that row's numerator and
denominator, so each query row subtracts its own max exponent. A factor on
the keys cancels only if it is the same for every key a query sees:
  - bidirectional: one max per (sequence, head) over the real keys (padded
    keys do not enter it, so padding cannot change the result);
  - causal: a data-dependent max would let a future key rescale (and possibly
    underflow) the features of past keys, so instead feature i of every key
    is divided by the data-independent constant exp(|w_i|^2 / 2) and feature i
    of every query multiplied by it, which leaves each product
    phi(q)_i phi(k)_i unchanged. A key feature becomes exp(-|x' - w_i|^2 / 2),
    which is at most 1 (no overflow) and depends on that key alone. It is
    about exp(-d / 2) for typical features, fine in float32 up to head_dim of
    about 128; larger head dims risk underflow (a row of zeros).

The features are a non-trainable `RandomFeatures` variable drawn from the
`params` stream at init; `redraw_features(key)` replaces them (the paper
redraws them periodically during training).

`performer_attention_weights` builds the [L, L] map phi(q) phi(k)^T with normalised
rows from the same features and stabilizers, for inspection at short lengths
(`attention.maps`).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import defaults_of
from efficient_transformers.attention.linear import (
  KernelizedAttention,
  check_positive_int,
  kernelized_attention_weights,
  linear_attention_from_features,
)
from efficient_transformers.attention.registry import register
from efficient_transformers.errors import ConfigError

_F32 = jnp.float32
KERNELS = ("softmax", "relu")
RELU_EPSILON = 1e-3


class RandomFeatures(nnx.Variable):
  """Performer's random projection [num_features, head_dim]: state, not a parameter.

  Optimizers built with `wrt=nnx.Param` leave it alone. The training system
  checkpoints parameters only and rebuilds this draw from the model seed, so a
  resumed run gets the same features; a `redraw_features` call made inside
  your own training loop is yours to save.
  """


def _check(variant_kwargs: dict) -> None:
  for name in ("num_features", "chunk_size"):
    check_positive_int("performer", name, variant_kwargs[name])
  kernel = variant_kwargs["kernel"]
  if kernel not in KERNELS:
    raise ConfigError(
      f"attention 'performer': kernel={kernel!r} is not one of {', '.join(KERNELS)}.",
      argument="attention_kwargs.kernel",
    )


def draw_random_features(
  key: jax.Array, num_features: int, head_dim: int, *, orthogonal: bool = True
) -> jax.Array:
  """Random projection rows w_i, [num_features, head_dim] float32.

  Args:
    key: PRNG key.
    num_features: m, the number of rows.
    head_dim: d.
    orthogonal: if True, rows come in blocks of d mutually orthogonal
      directions (QR of a Gaussian matrix, the last block truncated), each row
      rescaled to the norm of an independent d-dimensional Gaussian vector
      (chi-distributed), so every row is marginally Gaussian; if False, rows
      are iid Gaussian.
  """
  check_positive_int("performer", "num_features", num_features)
  if not orthogonal:
    return jax.random.normal(key, (num_features, head_dim), _F32)
  num_blocks = -(-num_features // head_dim)
  block_key, norm_key = jax.random.split(key)
  gaussian = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), _F32)
  q, r = jnp.linalg.qr(gaussian)
  # Signs of diag(r) make q Haar-distributed; rows of q^T are orthonormal.
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  directions = jnp.swapaxes(q, -1, -2).reshape(num_blocks * head_dim, head_dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), _F32), axis=-1)
  return directions * norms[:, None]


def performer_feature_maps(
  q: jax.Array,
  k: jax.Array,
  features: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  kernel: str = "softmax",
) -> tuple[jax.Array, jax.Array]:
  """phi(q) [batch, q_len, heads, m] and phi(k) [batch, kv_len, heads, m], float32.

  The softmax kernel's stabilizers (see the module docstring) rescale
  features by factors that cancel in the normalized attention; they are
  treated as constants (stop_gradient).
  """
  w = features.astype(_F32)
  num_features = w.shape[0]
  q, k = q.astype(_F32), k.astype(_F32)
  if kernel == "relu":
    phi = lambda x: (
      jax.nn.relu(jnp.einsum("blhd,md->blhm", x, w)) / math.sqrt(num_features) + RELU_EPSILON
    )
    return phi(q), phi(k)

  scale = q.shape[-1] ** -0.25

  def exponent(x):
    x = x * scale
    return jnp.einsum("blhd,md->blhm", x, w) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)

  q_exp, k_exp = exponent(q), exponent(k)
  real = True if mask is None else mask[:, :, None, None]
  if causal:
    half_norms = 0.5 * jnp.sum(w * w, axis=-1)  # [m]
    q_exp, k_exp = q_exp + half_norms, k_exp - half_norms
  else:
    k_max = jnp.max(jnp.where(real, k_exp, -jnp.inf), axis=(1, 3), keepdims=True)
    k_max = jnp.where(jnp.isfinite(k_max), k_max, 0.0)  # all keys padded
    k_exp = k_exp - jax.lax.stop_gradient(k_max)
  # Padded keys are dropped by the core anyway; a finite exponent here keeps
  # exp() (and so its gradient, 0 * exp) finite whatever junk they hold.
  k_exp = jnp.where(real, k_exp, 0.0)
  q_exp = q_exp - jax.lax.stop_gradient(jnp.max(q_exp, axis=-1, keepdims=True))
  norm = math.sqrt(num_features)
  return jnp.exp(q_exp) / norm, jnp.exp(k_exp) / norm


def performer_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  features: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  kernel: str = "softmax",
  chunk_size: int = 64,
) -> jax.Array:
  """FAVOR+ attention: softmax attention approximated with random features.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    features: [num_features, head_dim] projection rows, shared by all heads
      (see `draw_random_features`).
    mask: [batch, kv_length] bool, True = real token; or None. Padded keys
      are excluded.
    causal: query i sees keys j <= i only.
    kernel: "softmax" (unbiased estimate of softmax attention) or "relu".
    chunk_size: positions per chunk of the causal prefix sums.

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype (accumulated in float32).
    Rows of padded queries and rows with no visible key are zeros.

  Raises:
    ConfigError: unknown kernel, or chunk_size not a positive integer.
  """
  _check(dict(num_features=features.shape[0], chunk_size=chunk_size, kernel=kernel))
  masking.check_qkv("performer", q, k, v, mask)
  if features.ndim != 2 or features.shape[1] != q.shape[-1]:
    raise ValueError(
      f"performer: features must be [num_features, head_dim={q.shape[-1]}]; got {features.shape}."
    )
  phi_q, phi_k = performer_feature_maps(q, k, features, mask=mask, causal=causal, kernel=kernel)
  out = linear_attention_from_features(
    phi_q, phi_k, v, mask=mask, causal=causal, chunk_size=chunk_size
  )
  return out.astype(q.dtype)


@maps.register_weights("performer")
def performer_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  features: jax.Array,
  kernel: str = "softmax",
  chunk_size: int = 64,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `performer_attention` (its arguments).

  phi(q) phi(k)^T with the FAVOR+ (or relu) features of `performer_feature_maps`, the
  same stabilizers included (they cancel row by row), each row divided by its sum over
  the visible real keys. `chunk_size` only schedules the causal sums and does not change
  the map. Quadratic by nature; for inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length("performer", q.shape[1], k.shape[1], max_length)
  _check(dict(num_features=features.shape[0], chunk_size=chunk_size, kernel=kernel))
  phi_q, phi_k = performer_feature_maps(q, k, features, mask=mask, causal=causal, kernel=kernel)
  return kernelized_attention_weights(phi_q, phi_k, mask=mask, causal=causal)


_DEFAULTS = defaults_of(performer_attention, draw_random_features)


@register("performer")
class PerformerAttention(KernelizedAttention):
  """Multi-head FAVOR+ attention with non-trainable random features.

  Variant kwargs:
    num_features: random features m (default 256).
    kernel: "softmax" (FAVOR+, default) or "relu" (what LRA used).
    orthogonal: orthogonal random features (default True) or iid Gaussian.
    chunk_size: positions per chunk of the causal prefix sums (default 64).
  """

  def __init__(
    self,
    *,
    num_features: int = 256,
    kernel: str = _DEFAULTS.kernel,
    orthogonal: bool = _DEFAULTS.orthogonal,
    chunk_size: int = _DEFAULTS.chunk_size,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    _check(dict(num_features=num_features, chunk_size=chunk_size, kernel=kernel))
    super().__init__(**common)
    self.num_features = num_features
    self.kernel = kernel
    self.orthogonal = bool(orthogonal)
    self.chunk_size = chunk_size
    self.features = RandomFeatures(self._draw(common["rngs"].params()))

  def _draw(self, key: jax.Array) -> jax.Array:
    return draw_random_features(key, self.num_features, self.head_dim, orthogonal=self.orthogonal)

  def redraw_features(self, key: jax.Array) -> None:
    """Replaces the random features with a fresh draw from `key`."""
    self.features[...] = self._draw(key)

  @property
  def num_state_features(self) -> int:
    return self.num_features

  def feature_maps(self, q, k):
    # The causal form's stabilizers depend on each token alone, so a token's
    # features are the same decoded one at a time as in the full pass.
    return performer_feature_maps(q, k, self.features[...], causal=True, kernel=self.kernel)

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return performer_attention(q, k, v, mask=mask, causal=self.causal, **self.map_params())

  def map_params(self) -> dict:
    return {"features": self.features[...], "kernel": self.kernel, "chunk_size": self.chunk_size}
