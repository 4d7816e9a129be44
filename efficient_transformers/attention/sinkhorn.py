"""Sparse Sinkhorn attention: each block attends to itself and to a learned soft sort of blocks.

Tay, Bahri, Yang, Metzler and Juan, "Sparse Sinkhorn Attention" (ICML 2020).
The sequence is cut into CONTIGUOUS blocks of `block_size` tokens (a length
that is not a multiple is padded internally; the original LRA code grouped
strided tokens into a "block", a defect not repeated here). Per head:

  1. Block embeddings: the mean of each block's real keys (padded tokens
     excluded). Causal: the mean of all real keys in STRICTLY EARLIER blocks
     (an exclusive prefix mean, our form of the paper's cumulative sums), so
     that the sort row of query block a depends on no token at or after the
     start of block a; a block's own keys would leak the in-block future of
     its first queries.
  2. Sort logits R [nb, nb] = embeddings @ W[:, :nb], W [head_dim, max_blocks]
     a learned projection (max_blocks = ceil(max_length / block_size), sliced
     to the actual number of blocks nb).
  3. Sinkhorn normalization of R / temperature in log space: a row
     normalization, then per iteration a column and a row normalization (so
     rows sum to 1), then P = exp.
     Blocks without a real token have their row and column masked out, so
     appending padding blocks changes nothing. Causal: R is restricted to the
     strict lower triangle (block a draws only from blocks c < a; the first
     block has no sorted block), and the column normalization of row a sums
     over rows <= a only (a prefix sum): a plain column sum would let
     later rows, i.e. future tokens, rescale row a. The causal P is therefore
     row-stochastic and column-normalized cumulatively, not doubly stochastic.
  4. Sorted block a = sum_c P[a, c] block c (keys and values). Slot j of it is
     the P-weighted mixture of the REAL tokens at slot j of the blocks, with
     weight w[a, j] = sum_c P[a, c] real[c, j]; it enters the softmax as a key
     of multiplicity w (logit + log w), and slots with w below 1e-30 are
     masked. Without padding w = 1 and this is the paper's P @ blocks(K);
     with padding it keeps a hard permutation exact (a padded slot of the
     chosen block has weight ~0 instead of becoming a zero key of weight 1).
  5. Each query block attends, in one float32 softmax over 2 * block_size
     keys, to its own block (exact; causal mask inside it) and the sorted
     block.

Exact limit: when P is a hard permutation without fixed points (perm[a] != a;
causal: perm[a] < a), the output is exact softmax attention under
`sinkhorn_pattern` (own block + block perm[a]). Sort logits with one clear
maximum per row, at distinct blocks, drive Sinkhorn there (tested).

Cost per head, with b = block_size, nb = L / b, d = head_dim:
  time   O(L b d) for the attention, O(nb^2 b d) = O(L^2 d / b) for mixing
         blocks (small at LRA lengths with b = 64: nb = 64 at L = 4096),
         O(nb^2 * iterations) for Sinkhorn (causal: O(nb^3 * iterations), the
         prefix column sums being a triangular [nb, nb] matmul);
  memory O(L b) logits + O(L d) sorted keys/values + O(nb^2 * iterations).
No [L, L] array is built. Gradients are plain autodiff.

Not implemented: Gumbel noise in the Sinkhorn operator, SortCut, and
cross-attention (q_length must equal kv_length).

`sinkhorn_attention_weights` builds the [L, L] map of the own and sorted blocks
over the original positions, for inspection at short lengths (`attention.maps`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.local import masked_softmax, to_blocks
from efficient_transformers.attention.masking import pad_to
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_fits_sequence, check_positive_int
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers.partitioning import param_axes

_F32 = jnp.float32
# Masked log-weights: exp() of it is exactly 0, and sums of it stay finite.
_MASKED = -1e30
# Floor of the log-probabilities in the causal column sums (exp(-80) is a normal float32).
_LOG_FLOOR = -80.0
# A sorted slot whose real-token weight is below this counts as empty.
_MIN_WEIGHT = 1e-30


def _check_params(block_size, max_length, sinkhorn_iterations, temperature) -> None:
  check_positive_int("sinkhorn", "block_size", block_size)
  if max_length is not None:
    check_positive_int("sinkhorn", "max_length", max_length)
  check_positive_int("sinkhorn", "sinkhorn_iterations", sinkhorn_iterations)
  ok = isinstance(temperature, int | float) and not isinstance(temperature, bool)
  if not ok or not math.isfinite(temperature) or temperature <= 0:
    raise ConfigError(
      f"attention 'sinkhorn': temperature={temperature!r} must be a positive number.",
      argument="attention_kwargs.temperature",
    )


def max_blocks(max_length: int, block_size: int) -> int:
  """Columns of the sorting projection: ceil(max_length / block_size)."""
  return -(-max_length // block_size)


def sinkhorn_normalize(
  log_r: jax.Array, iterations: int, *, keep: jax.Array | None = None, causal: bool = False
) -> jax.Array:
  """Sinkhorn balancing in log space: a row normalization, then (column, row) pairs.

  Args:
    log_r: [..., n, n] log-weights (sort logits / temperature).
    iterations: number of (column, row) normalization pairs.
    keep: bool broadcastable to log_r, the entries allowed to be nonzero; or None.
    causal: normalize column c of row a over rows <= a only (a prefix sum),
      so row a never depends on later rows. The prefix sums run over
      probabilities (entries <= 0 after a row step), floored at exp(-80) so
      they never underflow to 0; they are a triangular matmul, which compiles
      far faster than a scan.

  Returns:
    log P, float32, same shape; entries outside `keep` are -1e30 (exp is 0).
    Rows with an allowed entry sum to 1 (up to rounding) after exp();
    without `causal` the columns approach 1 as iterations grow.
  """
  x = log_r.astype(_F32)
  keep = jnp.ones(x.shape[-2:], bool) if keep is None else keep
  keep = jnp.broadcast_to(keep, x.shape)
  earlier_or_same = jnp.tril(jnp.ones((x.shape[-2],) * 2, _F32))

  def rows(x):
    return jnp.where(keep, x - jax.nn.logsumexp(x, axis=-1, keepdims=True), _MASKED)

  def columns(x):
    if causal:
      probs = jnp.where(keep, jnp.exp(jnp.maximum(x, _LOG_FLOOR)), 0.0)
      prefix = jnp.einsum(
        "ar,...rc->...ac", earlier_or_same, probs, precision=jax.lax.Precision.HIGHEST
      )
      lse = jnp.log(jnp.where(prefix > 0, prefix, 1.0))
    else:
      lse = jax.nn.logsumexp(x, axis=-2, keepdims=True)
    return jnp.where(keep, x - lse, _MASKED)

  x = rows(jnp.where(keep, x, _MASKED))
  return jax.lax.fori_loop(0, iterations, lambda _, x: rows(columns(x)), x)


def block_embeddings(
  k: jax.Array, *, mask: jax.Array | None, causal: bool, block_size: int
) -> jax.Array:
  """Per-block key summaries [batch, heads, num_blocks, head_dim] (float32).

  Non-causal: the mean of block a's real keys. Causal: the mean of the real
  keys of blocks 0..a-1 (zero where there are none). Padded keys never enter.
  """
  length = k.shape[1]
  padded = -(-length // block_size) * block_size
  real = jnp.ones(k.shape[:2], bool) if mask is None else mask.astype(bool)
  real = to_blocks(pad_to(real, padded), block_size)  # [B, nb, b]
  kb = to_blocks(pad_to(k, padded), block_size)  # [B, nb, b, H, D]
  kb = jnp.where(real[..., None, None], kb.astype(_F32), 0.0)
  sums = kb.sum(axis=2).transpose(0, 2, 1, 3)  # [B, H, nb, D]
  counts = real.sum(axis=-1).astype(_F32)[:, None, :, None]  # [B, 1, nb, 1]
  if causal:
    sums = jnp.cumsum(sums, axis=2) - sums
    counts = jnp.cumsum(counts, axis=2) - counts
  return sums / jnp.maximum(counts, 1.0)


def sinkhorn_sort_matrix(
  k: jax.Array,
  sort_weights: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  block_size: int = 64,
  sinkhorn_iterations: int = 8,
  temperature: float = 0.75,
) -> jax.Array:
  """The soft block permutation P [batch, heads, nb, nb] (float32); row a mixes blocks c.

  Args:
    k: [batch, length, heads, head_dim] keys.
    sort_weights: [heads, head_dim, max_blocks] sorting projection W; its
      first nb = ceil(length / block_size) columns are used.
    mask: [batch, length] bool, True = real token; or None.
    causal, block_size, sinkhorn_iterations, temperature: see `sinkhorn_attention`.

  Returns:
    P with rows (and columns) of blocks without a real token zero; causal:
    P[a, c] = 0 for c >= a.
  """
  nb = -(-k.shape[1] // block_size)
  heads, head_dim = k.shape[2], k.shape[3]
  if sort_weights.ndim != 3 or sort_weights.shape[:2] != (heads, head_dim):
    raise ValueError(
      f"sinkhorn: sort_weights must be [heads={heads}, head_dim={head_dim}, max_blocks]; "
      f"got {sort_weights.shape}."
    )
  if nb > sort_weights.shape[2]:
    raise ConfigError(
      f"attention 'sinkhorn': input length {k.shape[1]} needs {nb} blocks of "
      f"block_size={block_size}, but the sorting projection has max_blocks="
      f"{sort_weights.shape[2]} = ceil(max_length / block_size); raise max_length to at "
      "least the sequence length.",
      argument="attention_kwargs.max_length",
    )
  emb = block_embeddings(k, mask=mask, causal=causal, block_size=block_size)
  log_r = jnp.einsum("bhnd,hdc->bhnc", emb, sort_weights[:, :, :nb].astype(_F32))
  if mask is None:
    nonempty = jnp.ones((k.shape[0], nb), bool)
  else:
    nonempty = to_blocks(pad_to(mask.astype(bool), nb * block_size), block_size).any(-1)
  keep = nonempty[:, None, :, None] & nonempty[:, None, None, :]  # [B, 1, nb, nb]
  if causal:
    keep = keep & jnp.tril(jnp.ones((nb, nb), bool), k=-1)
  log_p = sinkhorn_normalize(log_r / temperature, sinkhorn_iterations, keep=keep, causal=causal)
  return jnp.where(keep, jnp.exp(log_p), 0.0)


def sorted_block_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  sort_matrix: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  block_size: int = 64,
) -> jax.Array:
  """Each query block attends to its own block and the P-sorted block, in one softmax.

  Args:
    q, k, v: [batch, length, heads, head_dim].
    sort_matrix: P [batch, heads, nb, nb], nb = ceil(length / block_size);
      row a gives the weights of the blocks mixed into query block a's sorted
      block. Causal callers must pass P[a, c] = 0 for c >= a.
    mask: [batch, length] bool, True = real token; or None.
    causal: the causal mask inside the own block.
    block_size: tokens per block (b).

  Returns:
    [batch, length, heads, head_dim] in q's dtype (softmax in float32);
    padded query rows and rows with no visible key are zeros.
  """
  batch, length = q.shape[:2]
  b = block_size
  padded = -(-length // b) * b
  real, filled, safe_weight = _sorted_slots(sort_matrix, mask, batch, length, b)
  vb = to_blocks(pad_to(v, padded), b)  # [B, nb, b, H, D]
  weights = _block_weights(q, k, sort_matrix, real, filled, safe_weight, causal=causal)
  vs = _sort_blocks(vb, sort_matrix, real, safe_weight)
  out = jnp.einsum("bhnqk,bnkhd->bnqhd", weights[..., :b], vb.astype(_F32))
  out = out + jnp.einsum("bhnqk,bnkhd->bnqhd", weights[..., b:], vs)
  out = out.reshape(batch, padded, *q.shape[2:])[:, :length]
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


def _sorted_slots(
  sort_matrix: jax.Array, mask: jax.Array | None, batch: int, length: int, block_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The blocked real mask [B, nb, b], and per sorted slot [B, nb, b, H] whether it is
  filled and its real-token weight (1 where empty).

  Sorted slot (a, j) is the P-weighted mean of the real tokens at slot j of the blocks,
  of total weight w[a, j] = sum_c P[a, c] real[c, j]; it is empty where w < 1e-30.
  """
  padded = -(-length // block_size) * block_size
  real = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
  real = to_blocks(pad_to(real, padded), block_size)  # [B, nb, b]
  weight = jnp.einsum("bhac,bcj->bajh", sort_matrix.astype(_F32), real.astype(_F32))
  filled = weight > _MIN_WEIGHT
  return real, filled, jnp.where(filled, weight, 1.0)


def _sort_blocks(
  x: jax.Array, sort_matrix: jax.Array, real: jax.Array, safe_weight: jax.Array
) -> jax.Array:
  """Blocked x [B, nb, b, H, D] -> the sorted blocks [B, nb, b, H, D] float32."""
  x = jnp.where(real[..., None, None], x, jnp.zeros((), x.dtype))
  p = sort_matrix.astype(_F32)
  mixed = jnp.einsum("bhac,bcjhd->bajhd", p, x, preferred_element_type=_F32)
  return mixed / safe_weight[..., None]


def _block_weights(
  q: jax.Array,
  k: jax.Array,
  sort_matrix: jax.Array,
  real: jax.Array,
  filled: jax.Array,
  safe_weight: jax.Array,
  *,
  causal: bool,
) -> jax.Array:
  """The softmax weights [B, H, nb, b, 2b] of each query over its own block's keys, then
  the sorted block's slots (a slot of weight w enters as a key of multiplicity w).

  Args:
    q, k: [batch, length, heads, head_dim].
    sort_matrix: P [batch, heads, nb, nb].
    real, filled, safe_weight: from `_sorted_slots` (their shapes give the blocks).
    causal: the causal mask inside the own block.
  """
  batch, nb, b = real.shape
  padded = nb * b
  qb, kb = (to_blocks(pad_to(x, padded), b) for x in (q, k))  # [B, nb, b, H, D]
  ks = _sort_blocks(kb, sort_matrix, real, safe_weight)
  scale = q.shape[-1] ** -0.5
  own = jnp.einsum("bnqhd,bnkhd->bhnqk", qb, kb, preferred_element_type=_F32) * scale
  srt = jnp.einsum("bnqhd,bnkhd->bhnqk", qb.astype(_F32), ks) * scale
  srt = srt + jnp.log(safe_weight).transpose(0, 3, 1, 2)[:, :, :, None, :]
  keep_own = real[:, None, :, None, :]  # [B, 1, nb, 1, b]
  if causal:
    keep_own = keep_own & jnp.tril(jnp.ones((b, b), bool))
  keep_srt = filled.transpose(0, 3, 1, 2)[:, :, :, None, :]  # [B, H, nb, 1, b]
  shape = (batch, q.shape[2], nb, b, b)
  keep = jnp.concatenate(
    [jnp.broadcast_to(keep_own, shape), jnp.broadcast_to(keep_srt, shape)], axis=-1
  )
  return masked_softmax(jnp.concatenate([own, srt], axis=-1), keep)


def sinkhorn_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  sort_weights: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  block_size: int = 64,
  sinkhorn_iterations: int = 8,
  temperature: float = 0.75,
) -> jax.Array:
  """Sparse Sinkhorn attention (see the module docstring).

  A length that is not a multiple of `block_size` is padded internally; the
  padded tokens are masked like padding and their rows dropped.

  Args:
    q, k, v: [batch, length, heads, head_dim] (self-attention: equal lengths).
    sort_weights: [heads, head_dim, max_blocks] sorting projection W.
    mask: [batch, length] bool, True = real token; or None.
    causal: query i sees keys j <= i only: its own block causally, and a
      sorted block mixed from strictly earlier blocks.
    block_size: tokens per block (b).
    sinkhorn_iterations: (column, row) normalization pairs.
    temperature: the sort logits are divided by it before Sinkhorn.

  Returns:
    [batch, length, heads, head_dim] in q's dtype (softmax in float32).
    Padded query rows and rows with no visible key are zeros.

  Raises:
    ConfigError: a parameter is not positive, block_size > length, or the
      length needs more blocks than sort_weights has columns (max_length).
  """
  _check_params(block_size, None, sinkhorn_iterations, temperature)
  masking.check_qkv("sinkhorn", q, k, v, mask)
  if q.shape[1] != k.shape[1]:
    raise ValueError(
      f"sinkhorn: self-attention only (block a's sorted block is paired with query block a); "
      f"got q_length {q.shape[1]} != kv_length {k.shape[1]}."
    )
  check_fits_sequence("sinkhorn", "block_size", block_size, k.shape[1])
  p = sinkhorn_sort_matrix(
    k,
    sort_weights,
    mask=mask,
    causal=causal,
    block_size=block_size,
    sinkhorn_iterations=sinkhorn_iterations,
    temperature=temperature,
  )
  return sorted_block_attention(q, k, v, p, mask=mask, causal=causal, block_size=block_size)


@maps.register_weights("sinkhorn")
def sinkhorn_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  sort_weights: jax.Array | None = None,
  sort_matrix: jax.Array | None = None,
  block_size: int = 64,
  sinkhorn_iterations: int = 8,
  temperature: float = 0.75,
) -> jax.Array:
  """The map [batch, heads, L, L] float32 of `sinkhorn_attention` (its arguments).

  Query i of block a puts its own-block softmax weights on the keys of block a and the
  weight of sorted slot (a, j) on the tokens that slot mixes: P[a, c] real[c, j] / w[a, j]
  on token j of block c (w the slot's real-token weight), so map @ v is the output. The
  sort matrix P is the one its sorting network computes from k and `sort_weights`
  (`sinkhorn_sort_matrix`), or a given `sort_matrix` [batch, heads, nb, nb] (e.g. a hard
  `permutation_matrix`; causal: P[a, c] = 0 for c >= a). Rows of real queries sum to 1;
  padded (and, causal, later) keys get zero weight; padded query rows are zero.
  Quadratic by nature; for inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length("sinkhorn", q.shape[1], k.shape[1], max_length)
  _check_params(block_size, None, sinkhorn_iterations, temperature)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"sinkhorn: self-attention only; got q {q.shape}, k {k.shape}.")
  check_fits_sequence("sinkhorn", "block_size", block_size, k.shape[1])
  if (sort_weights is None) == (sort_matrix is None):
    raise ValueError("sinkhorn: pass exactly one of sort_weights and sort_matrix.")
  if sort_matrix is None:
    sort_matrix = sinkhorn_sort_matrix(
      k,
      sort_weights,
      mask=mask,
      causal=causal,
      block_size=block_size,
      sinkhorn_iterations=sinkhorn_iterations,
      temperature=temperature,
    )
  batch, length, heads = q.shape[:3]
  real, filled, safe_weight = _sorted_slots(sort_matrix, mask, batch, length, block_size)
  weights = _block_weights(q, k, sort_matrix, real, filled, safe_weight, causal=causal)
  nb, b = real.shape[1:]
  # Sorted slot (a, j) = sum_c mix[a, c, j] x[c, j]: [B, H, a, c, j].
  p = sort_matrix.astype(_F32)
  mix = p[..., None] * real[:, None, None].astype(_F32)
  mix = mix / safe_weight.transpose(0, 3, 1, 2)[:, :, :, None, :]
  full = jnp.einsum("bhaij,ac->bhaicj", weights[..., :b], jnp.eye(nb, dtype=_F32))
  full = full + jnp.einsum("bhaij,bhacj->bhaicj", weights[..., b:], mix)
  full = full.reshape(batch, heads, nb * b, nb * b)[:, :, :length, :length]
  if mask is not None:
    full = jnp.where(mask[:, None, :, None], full, 0.0)  # Padded query rows.
  return full


def permutation_matrix(permutation, num_blocks: int) -> np.ndarray:
  """Hard P [..., nb, nb] float32 from block indices [..., nb] (-1 = no sorted block)."""
  perm = np.asarray(permutation)
  return (perm[..., None] == np.arange(num_blocks)).astype(np.float32)


def sinkhorn_pattern(length: int, permutation, *, block_size: int, causal: bool) -> np.ndarray:
  """The dense boolean pattern [length, length] (or [heads, length, length]) under a hard P.

  Query i in block a sees its own block (causal: keys j <= i) and block
  permutation[a] (-1: none). It is what `sorted_block_attention` computes for
  P = permutation_matrix(permutation) when permutation[a] != a (a fixed point
  would count the own block twice); causal requires permutation[a] < a. For
  tests and plots only: it is O(L^2).
  """
  perm = np.asarray(permutation)
  blk = np.arange(length) // block_size
  own = blk[:, None] == blk[None, :]
  if causal:
    own = own & np.tril(np.ones((length, length), bool))
  return own | (perm[..., blk][..., :, None] == blk[None, :])


_DEFAULTS = defaults_of(sinkhorn_attention)


@register("sinkhorn")
class SinkhornAttention(MultiHeadAttention):
  """Multi-head Sparse Sinkhorn attention with a learned sorting network.

  Variant kwargs:
    block_size: tokens per block (default 64).
    max_length: longest input (default 4096); the sorting projection has
      ceil(max_length / block_size) columns.
    sinkhorn_iterations: Sinkhorn (column, row) normalization pairs (default 8).
    temperature: divides the sort logits before Sinkhorn (default 0.75).

  Parameter: `sort_weights` [heads, head_dim, max_blocks], LeCun-normal per
  head (near-uniform sorting at initialization).
  """

  def __init__(
    self,
    *,
    block_size: int = _DEFAULTS.block_size,
    max_length: int = 4096,
    sinkhorn_iterations: int = _DEFAULTS.sinkhorn_iterations,
    temperature: float = _DEFAULTS.temperature,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    _check_params(block_size, max_length, sinkhorn_iterations, temperature)
    super().__init__(**common)
    self.block_size = block_size
    self.max_length = max_length
    self.sinkhorn_iterations = sinkhorn_iterations
    self.temperature = float(temperature)
    shape = (self.num_heads, self.head_dim, max_blocks(max_length, block_size))
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    param_dtype = common.get("param_dtype", jnp.float32)
    self.sort_weights = nnx.Param(
      init(common["rngs"].params(), shape, param_dtype), **param_axes("heads", "kv", None)
    )

  def _check_length(self, length: int) -> None:
    if length > self.max_length:
      raise ConfigError(
        f"attention 'sinkhorn': input length {length} exceeds max_length={self.max_length}; "
        "raise it to at least the sequence length.",
        argument="attention_kwargs.max_length",
      )

  def pattern(self, length: int, permutation) -> np.ndarray:
    """The self-attention pattern [length, length] under a hard block permutation."""
    return sinkhorn_pattern(length, permutation, block_size=self.block_size, causal=self.causal)

  def sort_matrix(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """The soft block permutation P [batch, heads, nb, nb] for input x [batch, length, in]."""
    self._check_length(x.shape[1])
    return sinkhorn_sort_matrix(
      self.key(x),
      self.sort_weights[...],
      mask=mask,
      causal=self.causal,
      block_size=self.block_size,
      sinkhorn_iterations=self.sinkhorn_iterations,
      temperature=self.temperature,
    )

  def attention_weights(
    self, x: jax.Array, *, mask: jax.Array | None = None, max_length: int = maps.MAX_MAP_LENGTH
  ) -> jax.Array:
    """`MultiHeadAttention.attention_weights`, refusing a length above max_length."""
    self._check_length(x.shape[1])
    return super().attention_weights(x, mask=mask, max_length=max_length)

  def map_params(self) -> dict:
    return {
      "sort_weights": self.sort_weights[...],
      "block_size": self.block_size,
      "sinkhorn_iterations": self.sinkhorn_iterations,
      "temperature": self.temperature,
    }

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    self._check_length(k.shape[1])
    return sinkhorn_attention(q, k, v, mask=mask, causal=self.causal, **self.map_params())
