"""The Sparse Transformer's fixed and strided patterns, computed blockwise.

Child et al., "Generating Long Sequences with Sparse Transformers" (2019).
With l the block length (fixed) or the stride (strided) and c the summary
width, query i may see key j when:

  fixed:   j is in i's block (j // l == i // l), or j is one of the last c
           "summary" positions of a block (j mod l >= l - c): of a previous
           block when causal, of any block otherwise;
  strided: j is within the local window |i - j| < l, or (i - j) mod l == 0;

and, when causal, j <= i. The paper splits the two halves of a pattern over
different heads or layers; here each head computes ONE combined pattern, their
union, with a single softmax over it (the head-splitting variants are not
implemented). The original LRA code emulated these patterns with a dense
[L, L] mask; nothing here is quadratic:

  fixed:   per query block, its own l keys and the gathered summary keys
           [num_blocks * c] (a mask says which summary blocks the query
           block may see), in chunks of query blocks by a rematerialized
           loop. Time O(L (l + c L / l) d); memory O(L d) stored for the
           backward pass plus O(m l (l + c L / l)) for one chunk of m
           query blocks at a time.
  strided: the local window from the own and neighboring blocks of length l,
           concatenated with the keys of the query's residue class mod l
           (a strided reshape). Time O(L (3l + L / l) d), memory
           O(L (3l + L / l)) per head: O(L^1.5) at l ~ sqrt(L).

Overlaps between the two key sets are masked in one of them, so no key is
counted twice; the two sets share one softmax normalizer and are never
concatenated. Gradients are autodiff (through the rematerialized loop for the
fixed pattern; storing the blocked exponentials for the strided one).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.local import (
  check_fits_sequence,
  check_positive_int,
  from_heads_major_blocks,
  heads_major_blocks,
  masked_exp_parts,
  normalize,
  pad_to,
  pattern_attention_weights,
  shifted_blocks,
  to_blocks,
  weighted_sum,
  window_parts,
)
from efficient_transformers.attention.registry import register
from efficient_transformers.errors import ConfigError

_F32 = jnp.float32
PATTERNS = ("fixed", "strided")


def _check_params(pattern, block_size, num_summary, stride) -> None:
  if pattern not in PATTERNS:
    raise ConfigError(
      f"attention 'sparse': pattern={pattern!r} is not one of {list(PATTERNS)}.",
      argument="attention_kwargs.pattern",
    )
  check_positive_int("sparse", "block_size", block_size)
  check_positive_int("sparse", "num_summary", num_summary)
  if stride is not None:
    check_positive_int("sparse", "stride", stride)
  if num_summary > block_size:
    raise ConfigError(
      f"attention 'sparse': num_summary={num_summary} must be <= block_size={block_size}.",
      argument="attention_kwargs.num_summary",
    )


def sparse_pattern(
  q_len: int,
  kv_len: int,
  *,
  pattern: str = "fixed",
  block_size: int = 50,
  num_summary: int = 1,
  stride: int | None = None,
  causal: bool = False,
) -> np.ndarray:
  """The dense boolean pattern [q_len, kv_len] that `sparse_attention` computes.

  See the module docstring for the definition. For tests and plots only: it
  is O(L^2).
  """
  _check_params(pattern, block_size, num_summary, stride)
  i = np.arange(q_len)[:, None]
  j = np.arange(kv_len)[None, :]
  if pattern == "fixed":
    b, c = block_size, num_summary
    summary = j % b >= b - c
    if causal:
      summary = summary & (j // b < i // b)
    keep = (j // b == i // b) | summary
  else:
    b = block_size if stride is None else stride
    keep = (np.abs(i - j) < b) | ((i - j) % b == 0)
  if causal:
    keep = keep & (j <= i)
  return keep


# Query blocks per step of the fixed pattern's loop: about 1K queries at LRA's
# block 50, so a step's summary logits stay small.
_FIXED_CHUNK_BLOCKS = 20


def _fixed(q, k, v, keep, causal, b, c):
  """Blocked fixed pattern; lengths are a multiple of b. Returns [B, L, H, D].

  The query blocks are processed in chunks by a rematerialized loop: the
  summary logits ([L, c L / l], superlinear in L at a fixed l) exist for one
  chunk at a time, forward and backward, instead of being stored for the
  backward pass.
  """
  batch, length = q.shape[:2]
  num_blocks = length // b
  qb, kb, vb = (heads_major_blocks(x, b, length) for x in (q, k, v))  # [B, H, nb, b, D]
  keep_b = to_blocks(keep, b)  # [B, nb, b]
  # Summary keys: the last c positions of every block, [B, H, nb * c, D].
  ks, vs = (
    x[:, :, :, b - c :].reshape(*x.shape[:2], num_blocks * c, x.shape[-1]) for x in (kb, vb)
  )
  keep_s = keep_b[:, :, b - c :].reshape(batch, num_blocks * c)
  s_block = jnp.arange(num_blocks * c) // c  # the block of each summary key
  scale = q.shape[-1] ** -0.5

  # Chunks of m query blocks; the block count is padded up to a multiple of m
  # with masked blocks whose rows are dropped.
  m = min(_FIXED_CHUNK_BLOCKS, num_blocks)
  chunks = -(-num_blocks // m)

  def chunked(x, axis):  # [..., nb (axis), ...] -> [chunks, ..., m, ...]
    x = jnp.moveaxis(x, axis, 0)
    x = jnp.pad(x, [(0, chunks * m - num_blocks)] + [(0, 0)] * (x.ndim - 1))
    x = x.reshape(chunks, m, *x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1)

  qc_all, kc_all, vc_all = (chunked(x, 2) for x in (qb, kb, vb))  # [chunks, B, H, m, b, D]
  keep_c_all = chunked(keep_b, 1)  # [chunks, B, m, b]
  block_ids = jnp.arange(chunks * m).reshape(chunks, m)

  @jax.checkpoint
  def chunk(ks, vs, xs):
    qc, kc, vc, keep_c, ids = xs
    local = jnp.einsum("bhnqd,bhnkd->bhnqk", qc, kc, preferred_element_type=_F32) * scale
    summary = jnp.einsum("bhnqd,bhsd->bhnqs", qc, ks, preferred_element_type=_F32) * scale
    keep_local = keep_c[:, None, :, None, :]  # [B, 1, m, 1, b]
    if causal:
      keep_local = keep_local & jnp.tril(jnp.ones((b, b), bool))
    # The own block's summaries are already among its local keys.
    seen = s_block[None, :] < ids[:, None] if causal else s_block[None, :] != ids[:, None]
    keep_summary = keep_s[:, None, None, None, :] & seen[None, None, :, None, :]
    # One softmax over both key sets, never concatenated (see masked_exp_parts).
    exps, denom = masked_exp_parts([(local, keep_local), (summary, keep_summary)])
    out = weighted_sum(exps[:1], [vc]) + jnp.einsum(
      "bhnqs,bhsd->bhnqd", exps[1].astype(v.dtype), vs, preferred_element_type=_F32
    )
    return normalize(out, denom).astype(v.dtype)  # [B, H, m, b, D]

  out = jax.lax.map(
    functools.partial(chunk, ks, vs), (qc_all, kc_all, vc_all, keep_c_all, block_ids)
  )
  out = jnp.moveaxis(out, 0, 2)  # [B, H, chunks, m, b, D]
  out = out.reshape(batch, out.shape[1], chunks * m, b, out.shape[-1])
  return from_heads_major_blocks(out, length)


def _strided(q, k, v, keep, causal, b):
  """Blocked strided pattern; lengths are a multiple of b. Returns [B, L, H, D].

  Heads-major ([B, H, blocks, b, D]), as `local_attention`: the window's neighbour blocks
  each in their own einsum (`shifted_blocks`), the residue classes as the same blocks with
  their (block, residue) axes swapped; all parts under one softmax.
  """
  length = q.shape[1]
  num_blocks = length // b
  offsets = range(-1, 1 if causal else 2)
  qb, kb, vb = (heads_major_blocks(x, b, length) for x in (q, k, v))  # [B, H, nb, b, D]
  keep_b = to_blocks(keep, b)  # [B, nb, b]: block a, residue r = position a * b + r
  scale = q.shape[-1] ** -0.5

  q_pos = np.arange(b)[:, None]

  def window(o):  # [b, b]: within b positions (causal: and not after), every block
    k_pos = o * b + np.arange(b)[None, :]
    return (np.abs(q_pos - k_pos) < b) & ((k_pos <= q_pos) if causal else True)

  parts = window_parts(qb, kb, keep_b, offsets, pattern=window)
  # Residue classes: the same blocks with the (block, residue) axes swapped.
  kr, vr = kb.swapaxes(2, 3), vb.swapaxes(2, 3)  # [B, H, b, nb, D]
  strided = jnp.einsum("bhard,bhrcd->bharc", qb, kr, preferred_element_type=_F32) * scale
  # Same residue, other block: j = i itself is a local key already.
  a = np.arange(num_blocks)[:, None]
  cb = np.arange(num_blocks)[None, :]
  seen = cb < a if causal else cb != a  # [nb(a), nb(c)]
  keep_r = keep_b.swapaxes(1, 2)  # [B, b, nb]
  parts.append((strided, keep_r[:, None, None, :, :] & seen[None, None, :, None, :]))
  # One softmax over every key set, never concatenated (see masked_exp_parts).
  exps, denom = masked_exp_parts(parts)
  out = weighted_sum(exps[:-1], shifted_blocks(vb, offsets, axis=2))
  out = out + jnp.einsum(
    "bharc,bhrcd->bhard", exps[-1].astype(v.dtype), vr, preferred_element_type=_F32
  )
  return from_heads_major_blocks(normalize(out, denom), length)


@maps.register_weights("sparse")
def sparse_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  pattern: str = "fixed",
  block_size: int = 50,
  num_summary: int = 1,
  stride: int | None = None,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `sparse_attention` (its arguments).

  The masked softmax under `sparse_pattern` (one softmax over the union of the pattern's
  two halves, the fixed pattern's summary columns included) and the key mask; rows of
  padded queries and rows with no visible key are zeros. Quadratic by nature; for
  inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length("sparse", q.shape[1], k.shape[1], max_length)
  _check_params(pattern, block_size, num_summary, stride)
  if pattern == "fixed":
    check_fits_sequence("sparse", "block_size", block_size, k.shape[1])
  else:
    b = block_size if stride is None else stride
    check_fits_sequence("sparse", "stride" if stride is not None else "block_size", b, k.shape[1])
  keep = sparse_pattern(
    q.shape[1],
    k.shape[1],
    pattern=pattern,
    block_size=block_size,
    num_summary=num_summary,
    stride=stride,
    causal=causal,
  )
  return pattern_attention_weights(q, k, keep[None, None], mask=mask)


def sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  pattern: str = "fixed",
  block_size: int = 50,
  num_summary: int = 1,
  stride: int | None = None,
) -> jax.Array:
  """Softmax attention restricted to a Sparse Transformer pattern (`sparse_pattern`).

  Lengths are padded internally up to a multiple of the block (fixed) or the
  stride (strided); padded keys are masked and padded query rows dropped, so
  the result equals dense masked softmax under `sparse_pattern` for any length.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; or None.
    causal: query i sees keys j <= i only.
    pattern: "fixed" or "strided" (Child et al. 2019, section 4.3).
    block_size: the fixed pattern's block length l; the strided pattern's
      stride when `stride` is None (default 50, as in LRA).
    num_summary: the fixed pattern's summary width c (<= block_size).
    stride: the strided pattern's stride l; None means block_size.

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype (softmax in float32).
    Rows of padded queries (self-attention) and rows with no visible key are
    zeros.

  Raises:
    ConfigError: an unknown pattern, a size that is not a positive integer,
      num_summary > block_size, or a block (fixed) / stride (strided) larger
      than kv_length.
  """
  _check_params(pattern, block_size, num_summary, stride)
  masking.check_qkv("sparse", q, k, v, mask)
  batch, q_length = q.shape[:2]
  kv_length = k.shape[1]
  if pattern == "fixed":
    check_fits_sequence("sparse", "block_size", block_size, kv_length)
    b = block_size
  else:
    b = block_size if stride is None else stride
    check_fits_sequence("sparse", "stride" if stride is not None else "block_size", b, kv_length)
  padded = -(-max(q_length, kv_length) // b) * b
  keep = jnp.ones((batch, kv_length), bool) if mask is None else mask.astype(bool)
  q, k, v, keep = (pad_to(x, padded) for x in (q, k, v, keep))
  if pattern == "fixed":
    out = _fixed(q, k, v, keep, causal, b, num_summary)
  else:
    out = _strided(q, k, v, keep, causal, b)
  return masking.zero_padded_queries(out[:, :q_length], mask).astype(q.dtype)


_DEFAULTS = defaults_of(sparse_attention)


@register("sparse")
class SparseAttention(MultiHeadAttention):
  """Multi-head Sparse Transformer attention (see `sparse_attention`).

  Variant kwargs:
    pattern: "fixed" (default) or "strided".
    block_size: fixed block length l (default 50, as in LRA).
    num_summary: fixed summary width c (default 1).
    stride: strided stride l (default None: block_size).
  """

  def __init__(
    self,
    *,
    pattern: str = _DEFAULTS.pattern,
    block_size: int = _DEFAULTS.block_size,
    num_summary: int = _DEFAULTS.num_summary,
    stride: int | None = _DEFAULTS.stride,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    _check_params(pattern, block_size, num_summary, stride)
    super().__init__(**common)
    self.pattern_name = pattern
    self.block_size = block_size
    self.num_summary = num_summary
    self.stride = stride

  def _kwargs(self) -> dict:
    return dict(
      pattern=self.pattern_name,
      block_size=self.block_size,
      num_summary=self.num_summary,
      stride=self.stride,
      causal=self.causal,
    )

  def pattern(self, length: int) -> np.ndarray:
    """The boolean self-attention pattern [length, length] this module computes."""
    return sparse_pattern(length, length, **self._kwargs())

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return sparse_attention(q, k, v, mask=mask, **self._kwargs())

  def map_params(self) -> dict:
    return {name: value for name, value in self._kwargs().items() if name != "causal"}
