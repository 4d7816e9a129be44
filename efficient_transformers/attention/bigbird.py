"""BigBird attention (ITC form): window, global and random key blocks, in O(L) memory.

Zaheer et al., "Big Bird: Transformers for Longer Sequences" (NeurIPS 2020),
the internal-transformer-construction (ITC) variant. The sequence is cut into
contiguous blocks of `block_size` tokens (b); with w = num_window_blocks,
g = num_global_blocks and r = num_random_blocks:

  - a GLOBAL query block (the first block, and with g = 2 also the last one,
    as in the original ITC code) attends to every key: a dense row;
  - every other query block i attends to
      * its window: blocks i - (w - 1) / 2 .. i + (w - 1) / 2,
      * the global key blocks,
      * r random blocks, drawn per (head, query block) without replacement
        from the blocks that are neither in i's window nor global. When fewer
        than r such blocks exist, all of them are used (a validity mask, never
        an error), so a short enough sequence is exact softmax attention.
Each (query, key) pair enters the softmax at most once: a window block that is
also global is masked in the window part, and random blocks exclude both.

The random layout is data: indices [heads, num_blocks, r] drawn with
jax.random from `layout_key` (a PRNG key or an integer seed, possibly traced)
and used as gather indices, so one compiled function serves every layout.
The module keeps a per-layer seed (`LayoutSeed`, drawn from the `params`
stream at init, not trained), so layers and model seeds differ, and the same
seed reproduces the same layout.

Cost per head, with K = (w + g + r) b keys per sparse query: time
O(L K d + g b L d) and memory O(L K + g b L), forward and backward (plain
autodiff stores only the blocked exponentials, the gathered key/value blocks
and the g b dense global rows). No [L, L] array is built: the window and
random key and value blocks each non-global query block sees are gathered
into [batch, heads, num_blocks, (w + r) b, head_dim]; the global key blocks
are shared by all query blocks, not gathered; its logits are
[batch, heads, num_blocks, b, K] in two parts of one softmax (never
concatenated). The only quadratic-looking array is the
[heads, num_blocks, num_blocks] table of random scores over BLOCKS.

Differences from the LRA code (which wrapped the ITC kernel of the BigBird
release): it drew the random blocks with numpy's global random state at trace
time, masked padded keys with an additive -10000 (so they kept a small weight
and fully padded rows were not zero), and failed on sequences with too few
blocks for the random draw. Here the layout comes from an explicit key with
jax.random, padded keys are excluded exactly (any length is padded internally:
padded keys masked, padded query rows dropped), a short sequence clips the
window and the random blocks instead of failing, and the window width and the
number of global blocks are kwargs.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers.attention import masking
from efficient_transformers.attention.base import MultiHeadAttention
from efficient_transformers.attention.local import masked_exp_parts, masked_softmax, to_blocks
from efficient_transformers.attention.masking import pad_to
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import (
  check_fits_sequence,
  check_not_causal,
  check_positive_int,
)
from efficient_transformers.errors import ConfigError

_F32 = jnp.float32
_NOT_CAUSAL = (
  "ITC BigBird is bidirectional: its global blocks see and are seen by the whole sequence, "
  "and its random blocks may lie in the future"
)


class LayoutSeed(nnx.Variable):
  """BigBird's per-layer random-layout seed (an int32 scalar): state, not a parameter.

  Optimizers built with `wrt=nnx.Param` leave it alone; it is checkpointed
  with the rest of the model state, so a restored model keeps its layout.
  """


def _check_params(block_size, num_window_blocks, num_global_blocks, num_random_blocks) -> None:
  check_positive_int("bigbird", "block_size", block_size)
  check_positive_int("bigbird", "num_window_blocks", num_window_blocks)
  if num_window_blocks % 2 != 1:
    raise ConfigError(
      f"attention 'bigbird': num_window_blocks={num_window_blocks} must be odd (the block "
      "itself and as many on each side) (config.model.attention_kwargs.num_window_blocks)."
    )
  check_positive_int("bigbird", "num_global_blocks", num_global_blocks, minimum=0)
  if num_global_blocks > 2:
    raise ConfigError(
      f"attention 'bigbird': num_global_blocks={num_global_blocks} must be 0, 1 (the first "
      "block) or 2 (the first and the last) (config.model.attention_kwargs.num_global_blocks)."
    )
  check_positive_int("bigbird", "num_random_blocks", num_random_blocks, minimum=0)


def _as_key(layout_key) -> jax.Array:
  """A typed PRNG key from a key (typed or raw uint32[2]) or an integer seed (maybe traced)."""
  if isinstance(layout_key, int | np.integer):
    return jax.random.key(int(layout_key))
  x = jnp.asarray(layout_key)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) and x.ndim == 0:
    return x
  if x.dtype == jnp.uint32 and x.shape == (2,):
    return jax.random.wrap_key_data(x)
  if jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == 0:
    return jax.random.key(x)
  raise ConfigError(
    f"attention 'bigbird': layout_key must be a PRNG key or an integer seed; got dtype "
    f"{x.dtype} shape {x.shape}."
  )


class _Layout(NamedTuple):
  """The key blocks each query block's softmax covers, as slots (window, global, random).

  Masked slots (a window block outside the sequence or global, a random slot
  without a candidate) still hold a block id; `valid` excludes them. Rows of
  global query blocks are unused: those blocks are dense rows.
  """

  global_ids: np.ndarray  # [g'] sorted, distinct
  ids: jax.Array  # [heads, nb, S] int32, S = w' + g' + r'; the random slots are data
  valid: np.ndarray  # [nb, S] bool
  window_slots: int  # w'


def _global_ids(num_blocks: int, num_global_blocks: int) -> np.ndarray:
  """The global blocks: none, the first, or the first and the last (one block when nb = 1)."""
  return np.unique(np.array([0, num_blocks - 1][:num_global_blocks], dtype=np.int32))


@functools.partial(jax.jit, static_argnames=("heads", "num_random"))
def _draw_random_ids(key, candidates, *, heads, num_random):
  """[heads, nb, num_random] distinct block ids per row, candidates first, uniformly drawn."""
  shape = (heads, *candidates.shape)
  # Drawn flat and reshaped: XLA's CPU compiler takes seconds over a small 3-d threefry.
  scores = jax.random.uniform(key, (math.prod(shape),), _F32).reshape(shape)
  # Candidates score in [0, 1), the rest -1: the first counts[i] picks are candidates.
  scores = jnp.where(candidates, scores, -1.0)
  return jax.lax.top_k(scores, num_random)[1].astype(jnp.int32)


def _layout(num_blocks, heads, num_window_blocks, num_global_blocks, num_random_blocks, key):
  nb = num_blocks
  half = min((num_window_blocks - 1) // 2, nb - 1)
  global_ids = _global_ids(nb, num_global_blocks)
  is_global = np.zeros(nb, bool)
  is_global[global_ids] = True
  rows = np.arange(nb)
  window = rows[:, None] + np.arange(-half, half + 1)[None, :]
  window_valid = (window >= 0) & (window < nb)
  window = np.clip(window, 0, nb - 1)
  window_valid &= ~is_global[window]  # seen through the global slots
  # Random candidates: neither in the window nor global.
  candidates = (np.abs(rows[:, None] - rows[None, :]) > half) & ~is_global[None, :]
  counts = candidates.sum(axis=1)
  most = int(counts[~is_global].max()) if not is_global.all() else 0
  r = min(num_random_blocks, most)  # fewer when the candidates run out
  if r == 0:
    random_ids = jnp.zeros((heads, nb, 0), jnp.int32)
  else:
    random_ids = _draw_random_ids(_as_key(key), candidates, heads=heads, num_random=r)
  fixed = np.concatenate([window, np.broadcast_to(global_ids, (nb, len(global_ids)))], axis=1)
  ids = jnp.concatenate(
    [jnp.broadcast_to(fixed.astype(np.int32), (heads, *fixed.shape)), random_ids], axis=-1
  )
  valid = np.concatenate(
    [window_valid, np.ones((nb, len(global_ids)), bool), np.arange(r) < counts[:, None]], axis=1
  )
  return _Layout(global_ids, ids, valid, window.shape[1])


def bigbird_key_blocks(
  num_blocks: int,
  *,
  heads: int,
  num_window_blocks: int = 3,
  num_global_blocks: int = 2,
  num_random_blocks: int = 3,
  layout_key=0,
) -> np.ndarray:
  """The key blocks each sparse query block's softmax covers, slot by slot, as the kernel does.

  Args:
    num_blocks: blocks in the (padded) sequence.
    heads: number of heads (the random blocks differ per head).
    num_window_blocks, num_global_blocks, num_random_blocks, layout_key: as in
      `bigbird_attention`.

  Returns:
    int array [heads, num_blocks, w' + g' + r'] (window, global, random slots)
    of key-block ids, -1 where a slot is masked. Rows of global query blocks
    are all -1: those blocks are dense rows and see every key block.
  """
  _check_params(1, num_window_blocks, num_global_blocks, num_random_blocks)
  lay = _layout(
    num_blocks, heads, num_window_blocks, num_global_blocks, num_random_blocks, layout_key
  )
  ids = np.where(lay.valid[None], np.asarray(lay.ids), -1)
  ids[:, lay.global_ids] = -1
  return ids


def bigbird_pattern(
  length: int,
  *,
  heads: int,
  block_size: int = 64,
  num_window_blocks: int = 3,
  num_global_blocks: int = 2,
  num_random_blocks: int = 3,
  layout_key=0,
  kv_length: int | None = None,
) -> np.ndarray:
  """The dense boolean pattern [heads, length, kv_length] that `bigbird_attention` computes.

  A pattern is a set: a pair is allowed or not, so an oracle applying it
  counts every pair once (a kernel counting one twice would differ from it).
  For tests and plots only: it is O(L^2).

  Args:
    length: query length (and key length unless `kv_length` is given).
    heads: number of heads.
    block_size, num_window_blocks, num_global_blocks, num_random_blocks,
      layout_key: as in `bigbird_attention`.
    kv_length: key length for cross-attention; default `length`.

  Returns:
    bool [heads, length, kv_length].
  """
  kv_length = length if kv_length is None else kv_length
  _check_params(block_size, num_window_blocks, num_global_blocks, num_random_blocks)
  check_fits_sequence("bigbird", "block_size", block_size, kv_length)
  nb = -(-max(length, kv_length) // block_size)
  ids = bigbird_key_blocks(
    nb,
    heads=heads,
    num_window_blocks=num_window_blocks,
    num_global_blocks=num_global_blocks,
    num_random_blocks=num_random_blocks,
    layout_key=layout_key,
  )
  blocks = np.zeros((heads, nb + 1, nb + 1), bool)  # index nb collects the -1 slots
  h, i, _ = np.indices(ids.shape)
  blocks[h, i, np.where(ids < 0, nb, ids)] = True
  blocks = blocks[:, :nb, :nb]
  blocks[:, _global_ids(nb, num_global_blocks)] = True  # dense global rows
  dense = np.repeat(np.repeat(blocks, block_size, axis=1), block_size, axis=2)
  return dense[:, :length, :kv_length]


def _sparse_rows(qb, kb, vb, keep_b, lay, rows, scale):
  """Window + global + random attention for the query blocks `rows` (a slice); [B, m, b, H, D].

  The window and random slots (S' = w' + r' per query block) are gathered per
  head into [B, H, m, S' b, D]; masked slots (outside the sequence, a window
  block that is global, a random slot without a candidate) point at some block
  and are excluded by the validity mask. The global key blocks are the same
  for every query block, so they are not gathered: every query block meets
  them as one shared [B, g' b, H, D] part of the same softmax.
  """
  heads = kb.shape[3]
  w, g = lay.window_slots, len(lay.global_ids)
  own = np.r_[0:w, w + g : lay.ids.shape[-1]]  # window and random slots
  qm = qb[:, rows]
  ids, valid = lay.ids[:, rows][..., own], lay.valid[rows][:, own]  # [H, m, S'], [m, S']
  head = np.arange(heads)[:, None, None]
  kg, vg = (jnp.moveaxis(x, 3, 1)[:, head, ids] for x in (kb, vb))  # [B, H, m, S', b, D]
  kg, vg = (x.reshape(*x.shape[:3], -1, x.shape[-1]) for x in (kg, vg))  # [B, H, m, S' b, D]
  keep = keep_b[:, ids] & valid[None, None, :, :, None]  # [B, H, m, S', b]
  keep = keep.reshape(*keep.shape[:3], 1, -1)
  logits = jnp.einsum("bnqhd,bhnkd->bhnqk", qm, kg, preferred_element_type=_F32) * scale
  parts = [(logits, keep)]
  if g:
    k_glob, v_glob = (x[:, lay.global_ids].reshape(x.shape[0], -1, *x.shape[3:]) for x in (kb, vb))
    keep_glob = keep_b[:, lay.global_ids].reshape(keep_b.shape[0], 1, 1, 1, -1)
    g_logits = jnp.einsum("bnqhd,bkhd->bhnqk", qm, k_glob, preferred_element_type=_F32) * scale
    parts.append((g_logits, keep_glob))

  exps, denom = masked_exp_parts(parts)  # one softmax over both parts, never concatenated
  out = jnp.einsum("bhnqk,bhnkd->bnqhd", exps[0].astype(vb.dtype), vg, preferred_element_type=_F32)
  if g:
    out = out + jnp.einsum(
      "bhnqk,bkhd->bnqhd", exps[1].astype(vb.dtype), v_glob, preferred_element_type=_F32
    )
  return (out / jnp.moveaxis(denom, 1, -2)).astype(vb.dtype)  # denom [B, H, m, b, 1]


def _global_rows(qb, k, v, keep, lay, scale):
  """Dense rows for the global query blocks: [B, g, b, H, D]."""
  # Static slices (the global blocks are block 0 and/or the last), not a gather.
  qg = jnp.concatenate([qb[:, i : i + 1] for i in lay.global_ids], axis=1)
  logits = jnp.einsum("bgqhd,bkhd->bhgqk", qg, k, preferred_element_type=_F32) * scale
  weights = masked_softmax(logits, keep[:, None, None, None, :]).astype(v.dtype)
  return jnp.einsum("bhgqk,bkhd->bgqhd", weights, v)


def bigbird_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  block_size: int = 64,
  num_window_blocks: int = 3,
  num_global_blocks: int = 2,
  num_random_blocks: int = 3,
  layout_key=0,
) -> jax.Array:
  """Softmax attention restricted to the BigBird ITC pattern (`bigbird_pattern`).

  A length that is not a multiple of `block_size` is padded internally up to
  the next multiple; padded keys are masked and padded query rows dropped, so
  the result equals dense masked softmax under `bigbird_pattern` for any
  length. The window is clipped to the sequence and the random blocks to the
  available candidates, so a sequence of few blocks is exact softmax. A
  `block_size` larger than the sequence is an error rather than clipped.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; or None.
    causal: must be False (ITC BigBird is bidirectional: global blocks see
      and are seen by every position, and random blocks may lie ahead).
    block_size: tokens per block (b).
    num_window_blocks: odd window width in blocks (w): the block itself and
      (w - 1) / 2 on each side.
    num_global_blocks: 0, 1 (the first block) or 2 (the first and the last).
    num_random_blocks: random key blocks per (head, query block) (r).
    layout_key: PRNG key or integer seed (may be traced) of the random layout.

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype (softmax in float32).
    Rows of padded queries (self-attention) and rows with no visible key are
    zeros.

  Raises:
    ConfigError: causal=True; a size that is not a non-negative/positive
      integer; an even num_window_blocks; num_global_blocks > 2; or
      block_size > kv_length.
  """
  _check_params(block_size, num_window_blocks, num_global_blocks, num_random_blocks)
  check_not_causal("bigbird", causal, _NOT_CAUSAL)
  masking.check_qkv("bigbird", q, k, v, mask)
  batch, q_length = q.shape[:2]
  kv_length = k.shape[1]
  check_fits_sequence("bigbird", "block_size", block_size, kv_length)
  b = block_size
  nb = -(-max(q_length, kv_length) // b)
  padded = nb * b
  lay = _layout(nb, q.shape[2], num_window_blocks, num_global_blocks, num_random_blocks, layout_key)
  scale = q.shape[-1] ** -0.5

  keep = jnp.ones((batch, kv_length), bool) if mask is None else mask.astype(bool)
  qp, kp, vp, keep = (pad_to(x, padded) for x in (q, k, v, keep))
  qb, kb, vb = (to_blocks(x, b) for x in (qp, kp, vp))  # [B, nb, b, H, D]
  keep_b = to_blocks(keep, b)  # [B, nb, b]

  # Global blocks are a prefix (block 0) and/or a suffix (block nb - 1): the
  # sparse rows are the contiguous blocks between them.
  first = int(0 in lay.global_ids)
  last = nb - int(nb - 1 in lay.global_ids and nb > 1)
  pieces = []
  if len(lay.global_ids):
    dense = _global_rows(qb, kp, vp, keep, lay, scale)
  if first:
    pieces.append(dense[:, :1])
  if last > first:
    pieces.append(_sparse_rows(qb, kb, vb, keep_b, lay, slice(first, last), scale))
  if last < nb:
    pieces.append(dense[:, -1:])
  out = jnp.concatenate(pieces, axis=1).reshape(batch, padded, *q.shape[2:])[:, :q_length]
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


@register("bigbird")
class BigBirdAttention(MultiHeadAttention):
  """Multi-head BigBird (ITC) attention with a per-layer random layout (see `bigbird_attention`).

  Bidirectional only: causal=True is a ConfigError at build time.

  Variant kwargs:
    block_size: tokens per block (default 64).
    num_window_blocks: odd window width in blocks (default 3).
    num_global_blocks: 0, 1 (first block) or 2 (first and last; default).
    num_random_blocks: random blocks per (head, query block) (default 3).
  """

  def __init__(
    self,
    *,
    block_size: int = 64,
    num_window_blocks: int = 3,
    num_global_blocks: int = 2,
    num_random_blocks: int = 3,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    _check_params(block_size, num_window_blocks, num_global_blocks, num_random_blocks)
    check_not_causal("bigbird", common.get("causal", False), _NOT_CAUSAL)
    super().__init__(**common)
    self.block_size = block_size
    self.num_window_blocks = num_window_blocks
    self.num_global_blocks = num_global_blocks
    self.num_random_blocks = num_random_blocks
    seed = jax.random.randint(
      common["rngs"].params(), (), 0, np.iinfo(np.int32).max, dtype=jnp.int32
    )
    self.layout_seed = LayoutSeed(seed)

  def _kwargs(self) -> dict:
    return dict(
      block_size=self.block_size,
      num_window_blocks=self.num_window_blocks,
      num_global_blocks=self.num_global_blocks,
      num_random_blocks=self.num_random_blocks,
    )

  def pattern(self, length: int) -> np.ndarray:
    """The boolean self-attention pattern [heads, length, length] this module computes."""
    return bigbird_pattern(
      length, heads=self.num_heads, layout_key=int(self.layout_seed[...]), **self._kwargs()
    )

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return bigbird_attention(
      q, k, v, mask=mask, causal=self.causal, layout_key=self.layout_seed[...], **self._kwargs()
    )
