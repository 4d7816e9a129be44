"""Local (sliding-window) attention over contiguous blocks, in O(L) memory.

The blocked local attention of the Long Range Arena (Tay et al., "Long Range
Arena: A Benchmark for Efficient Transformers", 2020), itself the block-local
attention of Parmar et al., "Image Transformer" (2018). The sequence is cut
into CONTIGUOUS blocks of `block_size` tokens (the original LRA code grouped
strided tokens, a defect ruled out by the tests); each query block attends to
its own block and `num_neighbors` blocks on each side (causal: its own block,
with the in-block causal mask, and `num_neighbors` previous blocks).

Cost, with b = block_size and n = num_neighbors: O(L * b * (2n + 1) * d) time
and O(L * b * (2n + 1)) memory per head, forward and backward (plain autodiff
stores only the window's exponentials). No [L, L] array is built. The kernel works
heads-major ([batch, heads, blocks, block, d]) and pairs the query blocks with each
neighbour offset in its own einsum under one softmax (`masked_exp_parts`): no copy of
the neighbour blocks side by side, and no transpose around each einsum.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.masking import pad_to
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_fits_sequence, check_positive_int
from efficient_transformers.layers import positions

_F32 = jnp.float32


def to_blocks(x: jax.Array, block: int) -> jax.Array:
  """[batch, num_blocks * block, ...] -> [batch, num_blocks, block, ...]."""
  return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])


def heads_major_blocks(x: jax.Array, block: int, padded: int) -> jax.Array:
  """[batch, length, heads, d] -> [batch, heads, padded // block, block, d], zero-padded.

  The blocked kernels work heads-major: every einsum over blocks then has its batch axes
  (batch, heads, blocks) leading and its operands in the layout the dot wants, so XLA
  transposes each input once instead of around every einsum (forward and backward).
  """
  x = pad_to(x, padded).transpose(0, 2, 1, 3)
  return x.reshape(x.shape[0], x.shape[1], padded // block, block, *x.shape[3:])


def from_heads_major_blocks(x: jax.Array, length: int) -> jax.Array:
  """[batch, heads, num_blocks, block, d] -> [batch, length, heads, d] (padding dropped)."""
  batch, heads, num_blocks, block = x.shape[:4]
  x = x.reshape(batch, heads, num_blocks * block, *x.shape[4:])[:, :, :length]
  return x.transpose(0, 2, 1, 3)


def shifted_blocks(x: jax.Array, offsets: range, *, axis: int) -> list[jax.Array]:
  """For each offset o, x with block a + o at block a (zeros outside the sequence).

  `axis` is the blocks axis. The window's neighbour blocks as separate arrays: each pairs
  with the query blocks in its own einsum, so the neighbours of every block are never
  copied side by side (a concatenation would move (2n + 1)x the keys' bytes, forward
  and backward).
  """
  num_blocks = x.shape[axis]

  def shifted(o: int) -> jax.Array:
    if o == 0:
      return x  # The query's own blocks: no copy.
    kept = jax.lax.slice_in_dim(x, max(o, 0), num_blocks + min(o, 0), axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (max(-o, 0), max(o, 0))
    return jnp.pad(kept, widths)  # One copy per offset (a slice and its zero blocks).

  return [shifted(o) for o in offsets]


def window_parts(
  qb: jax.Array,
  kb: jax.Array,
  keep_b: jax.Array,
  offsets: range,
  pattern=None,
  bias=None,
) -> list[tuple[jax.Array, jax.Array]]:
  """The (logits, keep) parts of a blocked window, one per neighbour offset, for
  `masked_exp_parts`: the query blocks against each offset's key blocks (`shifted_blocks`).

  Args:
    qb, kb: heads-major blocks [B, H, nb, b, D] (`heads_major_blocks`).
    keep_b: the keys' keep mask in blocks [B, nb, b].
    offsets: the window's block offsets.
    pattern: None, or o -> bool [b, b] (numpy or jax) of the pairs offset o allows, query
      and key positions relative to the query block's start (key j at o * b + j).
    bias: None, or o -> an additive logit term broadcastable to [B, H, nb, b, b].

  Returns:
    [(logits [B, H, nb, b, b] float32, scaled by 1 / sqrt(d); keep, broadcastable)].
  """
  scale = qb.shape[-1] ** -0.5
  parts = []
  k_shifted, keep_shifted = (
    shifted_blocks(kb, offsets, axis=2),
    shifted_blocks(keep_b, offsets, axis=1),
  )
  for o, ko, keep_o in zip(offsets, k_shifted, keep_shifted, strict=True):
    logits = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, ko, preferred_element_type=_F32) * scale
    if bias is not None:
      logits = logits + bias(o)
    keep = keep_o[:, None, :, None, :]  # [B, 1, nb, 1, b]
    if pattern is not None:
      keep = keep & pattern(o)
    parts.append((logits, keep))
  return parts


def weighted_sum(exps: Sequence[jax.Array], values: Sequence[jax.Array]) -> jax.Array:
  """sum_i exps[i] @ values[i] over the key axis, float32: [..., q, k_i] x [..., k_i, d]."""
  return functools.reduce(
    jnp.add,
    [
      jnp.einsum("...qk,...kd->...qd", e.astype(x.dtype), x, preferred_element_type=_F32)
      for e, x in zip(exps, values, strict=True)
    ],
  )


def masked_softmax(logits: jax.Array, keep: jax.Array) -> jax.Array:
  """Float32 softmax over the last axis of `logits` restricted to `keep`; empty rows are 0."""
  logits = jnp.where(keep, logits, masking.large_negative(_F32))
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.where(keep.any(axis=-1, keepdims=True), weights, 0.0)


def pattern_attention_weights(
  q: jax.Array,
  k: jax.Array,
  keep: jax.Array,
  *,
  mask: jax.Array | None,
  bias: jax.Array | None = None,
) -> jax.Array:
  """The masked softmax of a structured attention as a dense map: quadratic by nature.

  softmax(q k^T / sqrt(d) + bias) over the pairs `keep` allows and the real keys, in
  float32: the map of local, sparse, Longformer and BigBird attention (`attention.maps`),
  each passing its own pattern. For inspection at short lengths only.

  Args:
    q: [batch, q_length, heads, head_dim].
    k: [batch, kv_length, heads, head_dim].
    keep: bool pattern broadcastable to [batch, heads, q_length, kv_length].
    mask: [batch, kv_length] bool, True = real token; or None.
    bias: an additive logit term broadcastable to the same shape, or None.

  Returns:
    [batch, heads, q_length, kv_length] float32. Rows with no visible key are zeros, and
    so are rows of padded queries when q_length == kv_length (self-attention).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32)
  logits = logits * (q.shape[-1] ** -0.5)
  if bias is not None:
    logits = logits + jnp.asarray(bias, _F32)
  keep = jnp.asarray(keep, bool)
  if mask is not None:
    keep = keep & mask.astype(bool)[:, None, None, :]
  weights = masked_softmax(logits, keep)
  if mask is not None and q.shape[1] == k.shape[1]:
    weights = jnp.where(mask.astype(bool)[:, None, :, None], weights, 0.0)  # Padded queries.
  return weights


def masked_exp_parts(
  parts: Sequence[tuple[jax.Array, jax.Array]],
) -> tuple[list[jax.Array], jax.Array]:
  """One softmax over several key sets, without concatenating their logits.

  The softmax of the concatenation of the parts' last axes, left unnormalized:
  the caller sums `exps[i] @ values[i]` and divides the [..., head_dim] result
  by `denom`. Normalizing the output instead of the weights keeps one
  [..., keys] buffer per part under autodiff (the exponentials) instead of
  logits, weights and their concatenation.

  Args:
    parts: (logits, keep) pairs; logits float32 [..., k_i], keep bool
      broadcastable to the logits. All leading axes must broadcast together.

  Returns:
    (exps, denom): exps[i] like logits i, zero where not kept; denom
    [..., 1], 1 for rows with no kept key (their exps are all zero, so their
    output is zero, with finite gradients).
  """
  neg = masking.large_negative(_F32)
  masked = [jnp.where(keep, logits, neg) for logits, keep in parts]
  # The shift cancels in the ratio; no gradient needs to flow through it.
  shift = jax.lax.stop_gradient(
    functools.reduce(jnp.maximum, [m.max(axis=-1, keepdims=True) for m in masked])
  )
  exps = [
    jnp.where(keep, jnp.exp(m - shift), 0.0) for m, (_, keep) in zip(masked, parts, strict=True)
  ]
  denom = functools.reduce(jnp.add, [e.sum(axis=-1, keepdims=True) for e in exps])
  return exps, jnp.where(denom > 0, denom, 1.0)


@jax.custom_vjp
def normalize(total: jax.Array, denom: jax.Array) -> jax.Array:
  """total / denom, float32: `masked_exp_parts`' weighted sum [..., d] over its denominator
  [..., 1], with the backward pass written from the output.

  d denom = -sum(g * out) / denom reads the saved output; autodiff of the division would
  read `total`, and XLA then recomputes the weighted sum's einsums inside the backward
  pass's fusion (measured: a third of local attention's step on CPU).
  """
  return total / denom


def _normalize_fwd(total, denom):
  out = total / denom
  return out, (out, denom)


def _normalize_bwd(res, g):
  out, denom = res
  g_total = g / denom
  return g_total, -jnp.sum(g_total * out, axis=-1, keepdims=True)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


def local_pattern(
  q_len: int, kv_len: int, *, block_size: int, num_neighbors: int, causal: bool
) -> np.ndarray:
  """The dense boolean pattern [q_len, kv_len] that `local_attention` computes.

  Query i may see key j when their blocks (i // block_size, j // block_size)
  are at most `num_neighbors` apart (causal: key block not after the query
  block, and j <= i). For tests and plots only: it is O(L^2).
  """
  qb = np.arange(q_len)[:, None] // block_size
  kb = np.arange(kv_len)[None, :] // block_size
  d = qb - kb
  if causal:
    return (
      (d >= 0) & (d <= num_neighbors) & (np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None])
    )
  return np.abs(d) <= num_neighbors


def _check_params(block_size, num_neighbors) -> None:
  check_positive_int("local", "block_size", block_size)
  check_positive_int("local", "num_neighbors", num_neighbors, minimum=0)


def local_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  block_size: int = 64,
  num_neighbors: int = 1,
  alibi_slopes: jax.Array | None = None,
) -> jax.Array:
  """Softmax attention restricted to contiguous neighboring blocks (`local_pattern`).

  A length that is not a multiple of `block_size` is padded internally up to
  the next multiple; the padded keys are masked out and the padded query rows
  dropped, so the result equals dense masked softmax under `local_pattern`.
  `num_neighbors` beyond the number of blocks is clipped: a window covering
  every block is exact softmax attention (the exactness limit). A
  `block_size` larger than the sequence is an error rather than clipped.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; or None.
    causal: query i sees keys j <= i only, in its own and previous blocks.
    block_size: tokens per block (b).
    num_neighbors: blocks seen on each side (n; causal: before only).
    alibi_slopes: None, or ALiBi's per-head slopes [heads]: adds
      -slope_h |i - j| to the logits, computed per block ([block, window],
      never [L, L]); self-attention positions (q_length == kv_length).

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype (softmax in float32).
    Rows of padded queries (self-attention) and rows with no visible key are
    zeros.

  Raises:
    ConfigError: a size is not a positive integer (num_neighbors: >= 0), or
      block_size > kv_length.
  """
  _check_params(block_size, num_neighbors)
  masking.check_qkv("local", q, k, v, mask)
  batch, q_length = q.shape[:2]
  kv_length = k.shape[1]
  check_fits_sequence("local", "block_size", block_size, kv_length)
  b = block_size
  num_blocks = -(-max(q_length, kv_length) // b)
  n = min(num_neighbors, num_blocks - 1)
  offsets = range(-n, 1 if causal else n + 1)
  padded = num_blocks * b

  keep = jnp.ones((batch, kv_length), bool) if mask is None else mask.astype(bool)
  qb = heads_major_blocks(q, b, padded)  # [B, H, nb, b, D]
  kb, vb = (heads_major_blocks(x, b, padded) for x in (k, v))
  keep_b = to_blocks(pad_to(keep, padded), b)  # [B, nb, b]
  # Positions relative to the query block's start; the same for every block.
  q_pos = np.arange(b)[:, None]
  k_pos = lambda o: o * b + np.arange(b)[None, :]
  parts = window_parts(
    qb,
    kb,
    keep_b,
    offsets,
    pattern=(lambda o: k_pos(o) <= q_pos) if causal else None,
    bias=None
    if alibi_slopes is None
    else lambda o: positions.alibi_bias(alibi_slopes, q_pos, k_pos(o))[None, :, None],
  )
  # One softmax over the window's blocks, never concatenated (see masked_exp_parts).
  exps, denom = masked_exp_parts(parts)
  out = normalize(weighted_sum(exps, shifted_blocks(vb, offsets, axis=2)), denom)  # [B,H,nb,b,D]
  out = from_heads_major_blocks(out.astype(q.dtype), q_length)
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


@maps.register_weights("local")
def local_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  block_size: int = 64,
  num_neighbors: int = 1,
  alibi_slopes: jax.Array | None = None,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `local_attention` (its arguments).

  The masked softmax under `local_pattern` and the key mask (with ALiBi's bias at the
  same positions as the kernel's); rows of padded queries and rows with no visible key
  are zeros. Quadratic by nature; for inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length("local", q.shape[1], k.shape[1], max_length)
  _check_params(block_size, num_neighbors)
  check_fits_sequence("local", "block_size", block_size, k.shape[1])
  keep = local_pattern(
    q.shape[1], k.shape[1], block_size=block_size, num_neighbors=num_neighbors, causal=causal
  )
  bias = None
  if alibi_slopes is not None:
    # The kernel's positions: query i and key j at i and j (block offsets cancel).
    bias = positions.alibi_bias(
      alibi_slopes, jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None, :]
    )[None]
  return pattern_attention_weights(q, k, keep[None, None], mask=mask, bias=bias)


_DEFAULTS = defaults_of(local_attention)


@register("local")
class LocalAttention(MultiHeadAttention):
  """Multi-head local attention over contiguous blocks (see `local_attention`).

  Variant kwargs:
    block_size: tokens per block (default 64, as in LRA).
    num_neighbors: blocks seen on each side (default 1; causal: before only).
  Takes position="alibi" (the bias is computed per block).
  """

  supports_alibi = True

  def __init__(
    self,
    *,
    block_size: int = _DEFAULTS.block_size,
    num_neighbors: int = _DEFAULTS.num_neighbors,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    _check_params(block_size, num_neighbors)
    super().__init__(**common)
    self.block_size = block_size
    self.num_neighbors = num_neighbors

  def pattern(self, length: int) -> np.ndarray:
    """The boolean self-attention pattern [length, length] this module computes."""
    return local_pattern(
      length,
      length,
      block_size=self.block_size,
      num_neighbors=self.num_neighbors,
      causal=self.causal,
    )

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return local_attention(q, k, v, mask=mask, causal=self.causal, **self.map_params())

  def map_params(self) -> dict:
    return dict(
      block_size=self.block_size,
      num_neighbors=self.num_neighbors,
      alibi_slopes=self.alibi_slopes(),
    )
