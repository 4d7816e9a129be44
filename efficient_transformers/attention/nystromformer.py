"""Nystromformer: softmax attention through a Nystrom approximation with landmarks.

Xiong et al., "Nystromformer: A Nystrom-Based Algorithm for Approximating
Self-Attention" (2021). With m landmarks Q~, K~ (segment means of the queries
and keys), softmax(Q K^T) is approximated by F A+ B with
  F = softmax(Q K~^T)   [L, m]
  A = softmax(Q~ K~^T)  [m, m], A+ by the paper's iterative pseudo-inverse
  B = softmax(Q~ K^T)   [m, L]
and the output is F (A+ (B V)): O(L m d) time and O(L m) memory per head; no
[L, L] array exists. An optional depthwise convolution over V (per head, along
the length axis) is added as a skip connection, as in the paper's code.

Padding and segments (the paper's code divides segment sums by the segment
size, padding included, and requires L divisible by m): each sequence's real
tokens, in order, are cut into m contiguous segments of equal size up to one
token, and a landmark is the mean over its segment's real tokens. The
landmarks therefore do not depend on padding, so appending padding or changing
the content under it leaves real outputs unchanged, and any L works. A
segment with no real token (m > real length) gives an empty landmark, which is
dropped: masked as a key in F and A, a zero row in A and B. Padded keys are
masked in B. With m >= the real length every landmark is one token and
F A+ B = S S+ S = S: exact softmax attention up to the pseudo-inverse's
convergence.

The pseudo-inverse's initialization Z0 = A^T / (max column sum * max row sum)
takes the maxima per matrix, not over the whole batch as the paper's code does,
so a sequence's output does not depend on the others in its batch.

Not supported: causal attention (landmarks average over future tokens).

`nystromformer_attention_weights` builds the [L, L] map F A+ B (plus the
convolution's band), for inspection at short lengths (`attention.maps`).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.local import masked_exp_parts, normalize
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_not_causal, check_positive_int
from efficient_transformers.layers.partitioning import param_axes

_F32 = jnp.float32
_NOT_CAUSAL = "landmarks average over future tokens"


def iterative_pinv(a: jax.Array, iterations: int) -> jax.Array:
  """Moore-Penrose pseudo-inverse of a [..., m, m] by the paper's iteration.

  Z0 = A^T / (||A||_1 ||A||_inf) (per matrix), then
  Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4. It converges to A+ for any
  A, singular included (zero rows and columns stay zero).
  """
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  norms = jnp.abs(a).sum(axis=-2).max(axis=-1) * jnp.abs(a).sum(axis=-1).max(axis=-1)
  norms = jnp.where(norms > 0, norms, 1.0)[..., None, None]
  z = jnp.swapaxes(a, -1, -2) / norms

  def step(_, z):
    az = a @ z
    return 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))

  return lax.fori_loop(0, iterations, step, z)


def _segments(mask: jax.Array, num_landmarks: int) -> tuple[jax.Array, jax.Array]:
  """Segment-mean weights [batch, length, m] and landmark presence [batch, m].

  Real token r (0-based among its sequence's n real tokens) is in segment
  floor(r m / n); padded tokens have weight 0.
  """
  real = mask.astype(jnp.int32)
  rank = jnp.cumsum(real, axis=1) - 1
  count = real.sum(axis=1, keepdims=True)
  segment = (rank * num_landmarks) // jnp.maximum(count, 1)
  onehot = jax.nn.one_hot(segment, num_landmarks, dtype=_F32) * mask[..., None]
  size = onehot.sum(axis=1)  # [batch, m]
  return onehot / jnp.maximum(size, 1.0)[:, None, :], size > 0


def _masked_softmax(logits: jax.Array, keep: jax.Array) -> jax.Array:
  """Softmax over the last axis with keys outside `keep`; all-masked rows are 0."""
  logits = jnp.where(keep, logits, masking.large_negative(_F32))
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.where(keep.any(axis=-1, keepdims=True), weights, 0.0)


def depthwise_conv(v: jax.Array, kernel: jax.Array) -> jax.Array:
  """Per-head convolution along the length axis, zero-padded to keep the length.

  Args:
    v: [batch, length, heads, head_dim].
    kernel: [kernel_size, heads], shared by a head's head_dim channels.
  """
  batch, length, heads, dim = v.shape
  size = kernel.shape[0]
  channels = heads * dim
  rhs = jnp.repeat(kernel.astype(v.dtype), dim, axis=1)[:, None, :]  # [size, 1, H*D]
  out = lax.conv_general_dilated(
    v.reshape(batch, length, channels),
    rhs,
    window_strides=(1,),
    padding=[((size - 1) // 2, size // 2)],
    dimension_numbers=("NWC", "WIO", "NWC"),
    feature_group_count=channels,
  )
  return out.reshape(batch, length, heads, dim)


def _real(k: jax.Array, mask: jax.Array | None) -> jax.Array:
  """The real-token mask [batch, length] bool (all True without a mask)."""
  return jnp.ones(k.shape[:2], bool) if mask is None else mask.astype(bool)


def nystrom_factors(
  q: jax.Array, k: jax.Array, real: jax.Array, num_landmarks: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The three softmax factors F, A, B of the Nystrom approximation, float32.

  Args:
    q, k: [batch, length, heads, head_dim].
    real: [batch, length] bool, True = real token.
    num_landmarks: m, segments per sequence (of its real tokens).

  Returns:
    F = softmax(Q K~^T) [batch, heads, length, m], A = softmax(Q~ K~^T) [batch, heads,
    m, m], B = softmax(Q~ K^T) [batch, heads, m, length] (scaled by 1 / sqrt(d)), with
    empty landmarks masked as keys and zero rows of A and B, padded keys masked in B.
  """
  seg_weights, present = _segments(real, num_landmarks)
  scale = q.shape[-1] ** -0.5
  qf, kf = q.astype(_F32) * scale, k.astype(_F32)
  q_land = jnp.einsum("blm,blhd->bmhd", seg_weights, qf)  # [batch, m, heads, d]
  k_land = jnp.einsum("blm,blhd->bmhd", seg_weights, kf)

  land_keep = present[:, None, None, :]  # [batch, 1, 1, m]
  f = _masked_softmax(jnp.einsum("blhd,bmhd->bhlm", qf, k_land), land_keep)
  a = _masked_softmax(jnp.einsum("bnhd,bmhd->bhnm", q_land, k_land), land_keep)
  b = _masked_softmax(jnp.einsum("bmhd,blhd->bhml", q_land, kf), real[:, None, None, :])
  # Empty landmarks are dropped as queries too: zero rows of A and B.
  rows = present[:, None, :, None]
  return f, jnp.where(rows, a, 0.0), jnp.where(rows, b, 0.0)


def nystromformer_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  num_landmarks: int = 64,
  pinv_iterations: int = 6,
  conv_kernel: jax.Array | None = None,
) -> jax.Array:
  """Nystrom approximation of softmax(q k^T / sqrt(d)) v (self-attention).

  Args:
    q, k, v: [batch, length, heads, head_dim] (one length: landmarks pair up
      queries and keys).
    mask: [batch, length] bool, True = real token; or None.
    causal: must be False.
    num_landmarks: m, segments per sequence (of its real tokens).
    pinv_iterations: iterations of the pseudo-inverse (the paper uses 6).
    conv_kernel: [kernel_size, heads] depthwise convolution over v added to
      the output (padded v rows zeroed first); or None.

  Returns:
    [batch, length, heads, head_dim] in q's dtype (computed in float32).
    Padded query rows are zeros.

  Raises:
    ConfigError: causal=True or a non-positive num_landmarks / negative
      pinv_iterations.
  """
  check_not_causal("nystromformer", causal, _NOT_CAUSAL)
  check_positive_int("nystromformer", "num_landmarks", num_landmarks, minimum=1)
  check_positive_int("nystromformer", "pinv_iterations", pinv_iterations, minimum=0)
  masking.check_qkv("nystromformer", q, k, v, mask)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"nystromformer: self-attention only; got q {q.shape}, k {k.shape}.")
  real = _real(k, mask)
  vf = jnp.where(real[:, :, None, None], v.astype(_F32), 0.0)
  # The factors as in `nystrom_factors`, computed heads-major, with F and B never
  # normalized: F (A+ (B V)) is taken as normalize(exp(F) @ W) and B V as
  # normalize(exp(B) @ V) (`local.masked_exp_parts`, `local.normalize`), so the two
  # [L, m] softmaxes keep one buffer each under autodiff and their backward needs no
  # reduction over the [L, m] weights.
  seg_weights, present = _segments(real, num_landmarks)
  scale = q.shape[-1] ** -0.5
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q.astype(_F32) * scale, k.astype(_F32), vf))
  q_land = jnp.einsum("blm,bhld->bhmd", seg_weights, qh)  # [batch, heads, m, d]
  k_land = jnp.einsum("blm,bhld->bhmd", seg_weights, kh)
  land_keep = present[:, None, None, :]  # [batch, 1, 1, m]
  rows = present[:, None, :, None]  # Empty landmarks: zero rows of A and B.
  a = _masked_softmax(jnp.einsum("bhnd,bhmd->bhnm", q_land, k_land), land_keep)
  a = jnp.where(rows, a, 0.0)
  b_logits = jnp.einsum("bhmd,bhld->bhml", q_land, kh)
  (b_exp,), b_denom = masked_exp_parts([(b_logits, real[:, None, None, :])])
  bv = jnp.where(rows, normalize(jnp.einsum("bhml,bhld->bhmd", b_exp, vh), b_denom), 0.0)
  w = iterative_pinv(a, pinv_iterations) @ bv  # [batch, heads, m, d]
  (f_exp,), f_denom = masked_exp_parts([(jnp.einsum("bhld,bhmd->bhlm", qh, k_land), land_keep)])
  out = normalize(jnp.einsum("bhlm,bhmd->bhld", f_exp, w), f_denom).transpose(0, 2, 1, 3)
  if conv_kernel is not None:
    out = out + depthwise_conv(vf, conv_kernel.astype(_F32))
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


@maps.register_weights("nystromformer")
def nystromformer_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  num_landmarks: int = 64,
  pinv_iterations: int = 6,
  conv_kernel: jax.Array | None = None,
) -> jax.Array:
  """The map [batch, heads, L, L] float32 of `nystromformer_attention` (its arguments).

  F A+ B, the product of its three factors (`nystrom_factors`, the same landmarks and
  masking, A+ by the same `iterative_pinv`), plus, with `conv_kernel`, the depthwise
  convolution of v as a banded matrix per head (`depthwise_conv` of the identity), so
  that map @ v is the output. Rows are not normalised (A+ is no softmax), but padded keys
  get zero weight (B masks them, the convolution sees zeroed padded rows) and padded
  query rows are zero. Quadratic by nature; for inspection at short lengths
  (`attention.maps`).
  """
  maps.check_map_length("nystromformer", q.shape[1], k.shape[1], max_length)
  check_not_causal("nystromformer", causal, _NOT_CAUSAL)
  check_positive_int("nystromformer", "num_landmarks", num_landmarks, minimum=1)
  check_positive_int("nystromformer", "pinv_iterations", pinv_iterations, minimum=0)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"nystromformer: self-attention only; got q {q.shape}, k {k.shape}.")
  real = _real(k, mask)
  f, a, b = nystrom_factors(q, k, real, num_landmarks)
  weights = f @ iterative_pinv(a, pinv_iterations) @ b
  if conv_kernel is not None:
    # Convolving the identity's columns gives, at [0, i, h, j], v_j's weight in output i.
    length, heads = k.shape[1], k.shape[2]
    eye = jnp.eye(length, dtype=_F32)[None, :, None, :]
    eye = jnp.broadcast_to(eye, (1, length, heads, length))
    band = depthwise_conv(eye, conv_kernel.astype(_F32))[0].transpose(1, 0, 2)  # [H, L, L]
    weights = weights + jnp.where(real[:, None, None, :], band[None], 0.0)
  if mask is not None:
    weights = jnp.where(real[:, None, :, None], weights, 0.0)  # Padded query rows.
  return weights


_DEFAULTS = defaults_of(nystromformer_attention)


@register("nystromformer")
class NystromformerAttention(MultiHeadAttention):
  """Multi-head Nystromformer attention.

  Variant kwargs:
    num_landmarks: landmarks per sequence (default 64).
    pinv_iterations: pseudo-inverse iterations (default 6, as in the paper).
      More is not always better: with m << L, A is ill-conditioned and a
      converged A+ amplifies its small singular values (measured: with 4
      landmarks at L = 32, 20 iterations gave a larger error than 6); only
      near the exactness limit (m ~ L) do 20-30 iterations pay off.
    conv_kernel_size: length of the depthwise convolution skip on V
      (default 0 = off; the paper uses 33). Parameter `conv_kernel`
      [conv_kernel_size, heads].
  """

  supports_causal = False
  why_not_causal = _NOT_CAUSAL

  def __init__(
    self,
    *,
    num_landmarks: int = _DEFAULTS.num_landmarks,
    pinv_iterations: int = _DEFAULTS.pinv_iterations,
    conv_kernel_size: int = 0,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    check_positive_int("nystromformer", "num_landmarks", num_landmarks, minimum=1)
    check_positive_int("nystromformer", "pinv_iterations", pinv_iterations, minimum=0)
    check_positive_int("nystromformer", "conv_kernel_size", conv_kernel_size, minimum=0)
    check_not_causal("nystromformer", common.get("causal", False), _NOT_CAUSAL)
    super().__init__(**common)
    rngs, param_dtype, num_heads = common["rngs"], self.param_dtype, self.num_heads
    self.num_landmarks = num_landmarks
    self.pinv_iterations = pinv_iterations
    self.conv_kernel_size = conv_kernel_size
    # PyTorch's Conv2d default (the paper's code): U(+-1/sqrt(fan_in)).
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0, out_axis=1)
    self.conv_kernel = (
      nnx.Param(
        init(rngs.params(), (conv_kernel_size, num_heads), param_dtype),
        **param_axes(None, "heads"),
      )
      if conv_kernel_size
      else None
    )

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return nystromformer_attention(q, k, v, mask=mask, causal=self.causal, **self.map_params())

  def map_params(self) -> dict:
    return {
      "num_landmarks": self.num_landmarks,
      "pinv_iterations": self.pinv_iterations,
      "conv_kernel": None if self.conv_kernel is None else self.conv_kernel[...],
    }
