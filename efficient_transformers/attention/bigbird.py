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

"The sequence" is each row's real part: its real length n is the index of its
last real key + 1 (the mask may have holes before it; they stay masked keys
of that layout), and its blocks are the ceil(n / b) blocks holding real
keys. The last global block is the last of these, windows are clipped to
them and random blocks are drawn among them, so a text gets the same layout
(and outputs) however far its batch is padded. The layout has a batch axis.

The random layout is data: indices [batch, heads, num_blocks, r], the top-r
scores among each row's candidates, used as gather indices, so one compiled
function serves every layout. The score of key block j for query block i in
head h is drawn from a key folded from (`layout_key`, h, i, j) with
jax.random (`layout_key`: a PRNG key or an integer seed, possibly traced),
so it does not depend on how many blocks the padded sequence has.
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
concatenated). The only quadratic-looking arrays are the
[batch, heads, num_blocks, num_blocks] random scores over BLOCKS (L^2 / b^2
per row and head).

Differences from the LRA code (which wrapped the ITC kernel of the BigBird
release): it drew the random blocks with numpy's global random state at trace
time, masked padded keys with an additive -10000 (so they kept a small weight
and fully padded rows were not zero), and failed on sequences with too few
blocks for the random draw; its block count and last global block came from
the padded length. Here the layout comes from an explicit key with
jax.random and each row's real length, padded keys are excluded exactly (any
length is padded internally: padded keys masked, padded query rows dropped),
a short sequence clips the window and the random blocks instead of failing,
and the window width and the number of global blocks are kwargs.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.local import (
  masked_exp_parts,
  masked_softmax,
  normalize,
  pattern_attention_weights,
  to_blocks,
)
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
      "itself and as many on each side).",
      argument="attention_kwargs.num_window_blocks",
    )
  check_positive_int("bigbird", "num_global_blocks", num_global_blocks, minimum=0)
  if num_global_blocks > 2:
    raise ConfigError(
      f"attention 'bigbird': num_global_blocks={num_global_blocks} must be 0, 1 (the first "
      "block) or 2 (the first and the last).",
      argument="attention_kwargs.num_global_blocks",
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
  """Per sequence, the key blocks each query block's softmax covers (window, global, random).

  Masked slots (a window block outside the real sequence or global, a random
  slot without a candidate, a second global block equal to the first) still
  hold a block id; the validity masks exclude them. Rows of global query
  blocks are unused: those blocks are dense rows.
  """

  global_ids: jax.Array  # [batch, g'] int32: block 0, then the last real block
  global_valid: jax.Array  # [batch, g'] bool
  ids: jax.Array  # [batch, heads, nb, w' + r'] int32: window, then random slots
  valid: jax.Array  # [batch, 1 or heads, nb, w' + r'] bool
  window_slots: int  # w'


def _real_lengths(mask: jax.Array | None, batch: int, kv_length: int) -> jax.Array:
  """[batch] int32: the index of the last real key + 1 (0 if none); kv_length without a mask."""
  if mask is None:
    return jnp.full((batch,), kv_length, jnp.int32)
  positions = jnp.arange(1, kv_length + 1, dtype=jnp.int32)
  return jnp.where(mask.astype(bool), positions, 0).max(axis=1)


def _block_scores(key: jax.Array, heads: int, num_blocks: int) -> jax.Array:
  """[heads, nb, nb] uniform scores in [0, 1); entry (h, i, j) is a function of (key, h, i, j).

  Each entry has its own key, folded in from its indices, so a query block's
  scores do not depend on how many blocks the (padded) sequence has; a draw
  of shape [heads, nb, nb] would reshuffle them with nb.
  """
  # Flat, not nested vmaps: XLA's CPU compiler takes seconds over a small 3-d threefry.
  # i * heads + h numbers the (head, query block) pairs whatever nb is; few folds keep
  # compiling cheap (each is a threefry in the program).
  h, i, j = (
    jnp.asarray(x.ravel(), jnp.uint32) for x in np.indices((heads, num_blocks, num_blocks))
  )

  def score(h, i, j):
    folded = jax.random.fold_in(jax.random.fold_in(key, i * heads + h), j)
    return jax.random.uniform(folded, (), _F32)

  return jax.vmap(score)(h, i, j).reshape(heads, num_blocks, num_blocks)


@functools.partial(jax.jit, static_argnames=("num_blocks", "heads", "window", "globals_", "random"))
def _layout(real_blocks, key, *, num_blocks, heads, window, globals_, random) -> _Layout:
  """The layout of each sequence from its real block count `real_blocks` [batch] (>= 1)."""
  nb = num_blocks
  half = min((window - 1) // 2, nb - 1)  # wider windows only add slots that never hold a block
  rows = np.arange(nb)
  n = real_blocks[:, None, None]  # [B, 1, 1]
  last = real_blocks - 1
  global_ids = jnp.stack([jnp.zeros_like(last), last], axis=1)[:, :globals_]  # [B, g']
  global_valid = jnp.stack([last >= 0, last > 0], axis=1)[:, :globals_]  # one block: once

  def is_global(j):  # j broadcastable to [B, ..]: is block j global in its sequence?
    out = jnp.zeros_like(j, bool)
    if globals_ >= 1:
      out = out | (j == 0)
    if globals_ == 2:
      out = out | (j == n - 1)
    return out

  window_ids = rows[:, None] + np.arange(-half, half + 1)[None, :]  # [nb, w']
  window_valid = (window_ids >= 0) & (window_ids < n) & ~is_global(jnp.asarray(window_ids)[None])
  window_ids = np.clip(window_ids, 0, nb - 1)
  # Random candidates: real blocks neither in the window nor global.
  cols = jnp.asarray(rows)[None, None, :]
  candidates = (np.abs(rows[:, None] - rows[None, :]) > half)[None] & (cols < n) & ~is_global(cols)
  counts = candidates.sum(axis=-1)  # [B, nb]
  r = min(random, max(nb - half - 1, 0))  # at most this many candidates in any row
  if r:
    scores = jnp.where(candidates[:, None], _block_scores(key, heads, nb)[None], -1.0)
    # Candidates score in [0, 1), the rest -1: the first counts[b, i] picks are candidates,
    # in an order set by the scores alone, so the slot count r does not change them.
    random_ids = jax.lax.top_k(scores, r)[1].astype(jnp.int32)  # [B, H, nb, r]
  else:
    random_ids = jnp.zeros((real_blocks.shape[0], heads, nb, 0), jnp.int32)
  window_ids = np.broadcast_to(window_ids.astype(np.int32), (*random_ids.shape[:3], 2 * half + 1))
  ids = jnp.concatenate([window_ids, random_ids], axis=-1)
  valid = jnp.concatenate([window_valid, jnp.arange(r) < counts[..., None]], axis=-1)[:, None]
  return _Layout(global_ids, global_valid, ids, valid, 2 * half + 1)


def _real_blocks(real_lengths: jax.Array, block_size: int) -> jax.Array:
  """Blocks holding the real tokens, at least one (a fully padded row has only masked keys)."""
  return jnp.maximum(-(-real_lengths // block_size), 1).astype(jnp.int32)


def bigbird_key_blocks(
  num_blocks: int,
  *,
  heads: int,
  num_window_blocks: int = 3,
  num_global_blocks: int = 2,
  num_random_blocks: int = 3,
  layout_key=0,
  real_blocks: int | None = None,
) -> np.ndarray:
  """The key blocks each sparse query block's softmax covers, slot by slot, as the kernel does.

  Args:
    num_blocks: blocks in the (padded) sequence.
    heads: number of heads (the random blocks differ per head).
    num_window_blocks, num_global_blocks, num_random_blocks, layout_key: as in
      `bigbird_attention`.
    real_blocks: blocks holding real tokens, ceil(real length / block_size)
      (see `bigbird_attention`); default `num_blocks`. The layout is that of
      a sequence of `real_blocks` blocks, whatever `num_blocks` is.

  Returns:
    int array [heads, num_blocks, w' + g' + r'] (window, global, random slots)
    of key-block ids, -1 where a slot is masked. Rows of global query blocks
    (block 0, and block real_blocks - 1 with 2 global blocks) are all -1:
    those blocks are dense rows and see every key block.
  """
  _check_params(1, num_window_blocks, num_global_blocks, num_random_blocks)
  real_blocks = num_blocks if real_blocks is None else real_blocks
  if not 1 <= real_blocks <= num_blocks:
    raise ValueError(f"bigbird: real_blocks={real_blocks} must be in [1, {num_blocks}].")
  lay = _layout(
    jnp.asarray([real_blocks], jnp.int32),
    _as_key(layout_key),
    num_blocks=num_blocks,
    heads=heads,
    window=num_window_blocks,
    globals_=num_global_blocks,
    random=num_random_blocks,
  )
  ids = np.where(np.asarray(lay.valid[0]), np.asarray(lay.ids[0]), -1)  # [H, nb, w' + r']
  glob = np.where(np.asarray(lay.global_valid[0]), np.asarray(lay.global_ids[0]), -1)
  w = lay.window_slots
  glob = np.broadcast_to(glob, (heads, num_blocks, len(glob)))
  ids = np.concatenate([ids[..., :w], glob, ids[..., w:]], axis=-1)
  ids[:, _dense_rows(num_global_blocks, real_blocks)] = -1
  return ids


def _dense_rows(num_global_blocks: int, real_blocks: int) -> list[int]:
  """The global query blocks of a sequence of `real_blocks` blocks."""
  return sorted({0, real_blocks - 1}) if num_global_blocks == 2 else [0][:num_global_blocks]


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
  real_length: int | None = None,
) -> np.ndarray:
  """The dense boolean pattern [heads, length, kv_length] that `bigbird_attention` computes.

  A pattern is a set: a pair is allowed or not, so an oracle applying it
  counts every pair once (a kernel counting one twice would differ from it).
  The kernel computes this pattern, combined with the key mask, for a
  sequence whose real length (last real key + 1) is `real_length`. For tests
  and plots only: it is O(L^2).

  Args:
    length: query length (and key length unless `kv_length` is given).
    heads: number of heads.
    block_size, num_window_blocks, num_global_blocks, num_random_blocks,
      layout_key: as in `bigbird_attention`.
    kv_length: key length for cross-attention; default `length`.
    real_length: the index of the last real key + 1, in [0, kv_length];
      default kv_length (no padding). Keys from there on are padding: False.

  Returns:
    bool [heads, length, kv_length].
  """
  kv_length = length if kv_length is None else kv_length
  real_length = kv_length if real_length is None else real_length
  _check_params(block_size, num_window_blocks, num_global_blocks, num_random_blocks)
  check_fits_sequence("bigbird", "block_size", block_size, kv_length)
  if not 0 <= real_length <= kv_length:
    raise ValueError(f"bigbird: real_length={real_length} must be in [0, {kv_length}].")
  real_blocks = _real_blocks(jnp.asarray([real_length], jnp.int32), block_size)
  dense = _dense_pattern(
    real_blocks,
    _as_key(layout_key),
    q_length=length,
    kv_length=kv_length,
    heads=heads,
    block_size=block_size,
    num_window_blocks=num_window_blocks,
    num_global_blocks=num_global_blocks,
    num_random_blocks=num_random_blocks,
  )
  dense = np.array(dense[0])
  dense[:, :, real_length:] = False
  return dense


def _dense_pattern(
  real_blocks: jax.Array,
  key: jax.Array,
  *,
  q_length: int,
  kv_length: int,
  heads: int,
  block_size: int,
  num_window_blocks: int,
  num_global_blocks: int,
  num_random_blocks: int,
) -> jax.Array:
  """The pattern [batch, heads, q_length, kv_length] bool of sequences of `real_blocks`
  [batch] real blocks: `bigbird_pattern` before padding is masked, traceable (O(L^2)).

  Key block j is allowed for query block i when the kernel's layout (`_layout`) puts it
  in i's window, global or random slots, and always for the dense global query blocks.
  """
  nb = -(-max(q_length, kv_length) // block_size)
  lay = _layout(
    real_blocks,
    key,
    num_blocks=nb,
    heads=heads,
    window=num_window_blocks,
    globals_=num_global_blocks,
    random=num_random_blocks,
  )
  blocks = jnp.arange(nb)
  # One-hot over key blocks, then any over slots: [B, H, nb, nb] and [B, nb].
  slots = ((lay.ids[..., None] == blocks) & lay.valid[..., None]).any(axis=-2)
  glob = ((lay.global_ids[..., None] == blocks) & lay.global_valid[..., None]).any(axis=-2)
  dense_rows = jnp.zeros((real_blocks.shape[0], nb), bool)
  if num_global_blocks >= 1:
    dense_rows = dense_rows | (blocks[None] == 0)
  if num_global_blocks == 2:
    dense_rows = dense_rows | (blocks[None] == (real_blocks - 1)[:, None])
  pattern = slots | glob[:, None, None, :] | dense_rows[:, None, :, None]
  pattern = jnp.repeat(jnp.repeat(pattern, block_size, axis=2), block_size, axis=3)
  return pattern[:, :, :q_length, :kv_length]


@maps.register_weights("bigbird")
def bigbird_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  block_size: int = 64,
  num_window_blocks: int = 3,
  num_global_blocks: int = 2,
  num_random_blocks: int = 3,
  layout_key=0,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `bigbird_attention` (its arguments).

  The masked softmax under each row's `bigbird_pattern` (the layout of its real length,
  the random blocks drawn from `layout_key`, dense rows for the global query blocks) and
  the key mask. Traceable (the mask and the key may be traced, as in the kernel). Rows
  of padded queries and rows with no visible key are zeros. Quadratic by nature; for
  inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length("bigbird", q.shape[1], k.shape[1], max_length)
  _check_params(block_size, num_window_blocks, num_global_blocks, num_random_blocks)
  check_not_causal("bigbird", causal, _NOT_CAUSAL)
  batch, q_length, heads = q.shape[:3]
  kv_length = k.shape[1]
  check_fits_sequence("bigbird", "block_size", block_size, kv_length)
  keep = _dense_pattern(
    _real_blocks(_real_lengths(mask, batch, kv_length), block_size),
    _as_key(layout_key),
    q_length=q_length,
    kv_length=kv_length,
    heads=heads,
    block_size=block_size,
    num_window_blocks=num_window_blocks,
    num_global_blocks=num_global_blocks,
    num_random_blocks=num_random_blocks,
  )
  return pattern_attention_weights(q, k, keep, mask=mask)


def _per_row(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x [B, nb, ...] gathered per row along blocks: x[b, ids[b, ...]], [B, *ids.shape[1:], ...]."""
  return jax.vmap(lambda x, i: x[i])(x, ids)


def _sparse_rows(qb, kb, vb, keep_b, lay, first, scale):
  """Window + global + random attention for the query blocks from `first` on; [B, m, b, H, D].

  The window and random slots (S' = w' + r' per query block) are gathered per
  row and head into [B, H, m, S' b, D]; masked slots (outside the real
  sequence, a window block that is global, a random slot without a
  candidate) point at some block and are excluded by the validity mask. The
  global key blocks are the same for every query block of a row, so they are
  gathered once: every query block meets them as one shared [B, g' b, H, D]
  part of the same softmax.
  """
  heads = kb.shape[3]
  qm = qb[:, first:]
  ids, valid = lay.ids[:, :, first:], lay.valid[:, :, first:]  # [B, H, m, S'], [B, 1, m, S']
  head = np.arange(heads)[:, None, None]
  gather = jax.vmap(lambda x, i: x[head, i])  # per row: [H, nb, b, D] by [H, m, S']
  kg, vg = (gather(jnp.moveaxis(x, 3, 1), ids) for x in (kb, vb))  # [B, H, m, S', b, D]
  kg, vg = (x.reshape(*x.shape[:3], -1, x.shape[-1]) for x in (kg, vg))  # [B, H, m, S' b, D]
  keep = _per_row(keep_b, ids) & valid[..., None]  # [B, H, m, S', b]
  keep = keep.reshape(*keep.shape[:3], 1, -1)
  logits = jnp.einsum("bnqhd,bhnkd->bhnqk", qm, kg, preferred_element_type=_F32) * scale
  parts = [(logits, keep)]
  g = lay.global_ids.shape[1]
  if g:
    k_glob, v_glob = (_per_row(x, lay.global_ids) for x in (kb, vb))  # [B, g', b, H, D]
    k_glob, v_glob = (x.reshape(x.shape[0], -1, *x.shape[3:]) for x in (k_glob, v_glob))
    keep_glob = _per_row(keep_b, lay.global_ids) & lay.global_valid[..., None]  # [B, g', b]
    keep_glob = keep_glob.reshape(keep_b.shape[0], 1, 1, 1, -1)
    g_logits = jnp.einsum("bnqhd,bkhd->bhnqk", qm, k_glob, preferred_element_type=_F32) * scale
    parts.append((g_logits, keep_glob))

  exps, denom = masked_exp_parts(parts)  # one softmax over both parts, never concatenated
  out = jnp.einsum("bhnqk,bhnkd->bnqhd", exps[0].astype(vb.dtype), vg, preferred_element_type=_F32)
  if g:
    out = out + jnp.einsum(
      "bhnqk,bkhd->bnqhd", exps[1].astype(vb.dtype), v_glob, preferred_element_type=_F32
    )
  return normalize(out, jnp.moveaxis(denom, 1, -2)).astype(vb.dtype)  # denom [B, H, m, b, 1]


def _global_rows(qb, k, v, keep, lay, scale):
  """Dense rows for each row's global query blocks (`lay.global_ids`): [B, g', b, H, D]."""
  qg = _per_row(qb, lay.global_ids)  # [B, g', b, H, D]
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

  Each row's layout is that of its real part (see the module docstring):
  its real length n is the index of its last real key + 1, so appending
  padding, or changing what sits in padded positions, leaves the real
  outputs unchanged. A length that is not a multiple of `block_size` is
  padded internally up to the next multiple; padded keys are masked and
  padded query rows dropped, so each row equals dense masked softmax under
  `bigbird_pattern(..., real_length=n)` for any length. The window is
  clipped to the sequence and the random blocks to the available candidates,
  so a sequence of few blocks is exact softmax. A `block_size` larger than
  the sequence is an error rather than clipped.

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
  real_blocks = _real_blocks(_real_lengths(mask, batch, kv_length), b)  # [B]
  lay = _layout(
    real_blocks,
    _as_key(layout_key),
    num_blocks=nb,
    heads=q.shape[2],
    window=num_window_blocks,
    globals_=num_global_blocks,
    random=num_random_blocks,
  )
  scale = q.shape[-1] ** -0.5

  keep = jnp.ones((batch, kv_length), bool) if mask is None else mask.astype(bool)
  qp, kp, vp, keep = (pad_to(x, padded) for x in (q, k, v, keep))
  qb, kb, vb = (to_blocks(x, b) for x in (qp, kp, vp))  # [B, nb, b, H, D]
  keep_b = to_blocks(keep, b)  # [B, nb, b]

  # Block 0 is global in every row (a static prefix); the last real block,
  # global with g = 2, moves with the row, so it is computed as a sparse row
  # too and replaced by its dense row.
  first = int(num_global_blocks > 0)
  pieces = []
  if first:
    dense = _global_rows(qb, kp, vp, keep, lay, scale)  # [B, g, b, H, D]
    pieces.append(dense[:, :1])
  if nb > first:
    pieces.append(_sparse_rows(qb, kb, vb, keep_b, lay, first, scale))
  out = jnp.concatenate(pieces, axis=1)  # [B, nb, b, H, D]
  if num_global_blocks == 2:
    is_last = np.arange(nb)[None, :] == (real_blocks - 1)[:, None]  # [B, nb]
    out = jnp.where(is_last[:, :, None, None, None], dense[:, 1:], out)
  out = out.reshape(batch, padded, *q.shape[2:])[:, :q_length]
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


_DEFAULTS = defaults_of(bigbird_attention)


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

  supports_causal = False
  why_not_causal = _NOT_CAUSAL

  def __init__(
    self,
    *,
    block_size: int = _DEFAULTS.block_size,
    num_window_blocks: int = _DEFAULTS.num_window_blocks,
    num_global_blocks: int = _DEFAULTS.num_global_blocks,
    num_random_blocks: int = _DEFAULTS.num_random_blocks,
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

  def pattern(self, length: int, real_length: int | None = None) -> np.ndarray:
    """The boolean self-attention pattern [heads, length, length] this module computes.

    For a sequence whose last real token is at real_length - 1 (default:
    no padding); see `bigbird_pattern`.
    """
    return bigbird_pattern(
      length,
      heads=self.num_heads,
      layout_key=int(self.layout_seed[...]),
      real_length=real_length,
      **self._kwargs(),
    )

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return bigbird_attention(
      q, k, v, mask=mask, causal=self.causal, layout_key=self.layout_seed[...], **self._kwargs()
    )

  def map_params(self) -> dict:
    return dict(layout_key=self.layout_seed[...], **self._kwargs())
