"""Reformer: LSH (locality-sensitive hashing) attention with shared queries and keys.

Kitaev, Kaiser and Levskaya, "Reformer: The Efficient Transformer" (ICLR 2020).
Keys are the queries, normalized to unit length (shared-QK attention), so a
query and its key hash alike. Each of `num_hashes` rounds hashes every token
with a random rotation R [head_dim, num_buckets / 2] (independent per round
and per head) into bucket argmax([xR, -xR]), sorts the tokens by (bucket,
position), cuts the sorted sequence into chunks of `chunk_size` and lets each
chunk attend to itself and to the previous chunk of the same round (no wrap
around: the first chunk looks back at nothing). Rounds are combined by their
log-sum-exps: out = sum_r softmax_r(lse_r) * out_r.

Details of this implementation:
  - A token does not attend to itself unless it has no other visible key: its
    own logit is set to -1e5 (above the -1e9 of invisible keys, so a token
    alone in its window attends to itself), as in the paper.
  - Keys of another bucket inside the window are NOT masked, so when one chunk
    covers the whole sequence the result is exactly full shared-QK attention,
    whatever the hash (the exactness limit the tests pin).
  - A key that two rounds both bring into a query's window is counted in both
    rounds (no de-duplication); within one round the two chunks of a window
    are disjoint, so no key is seen twice there.
  - Causal: each query sees, in each round, itself and the `chunk_size`
    latest earlier tokens of its own bucket (a sliding window over the sorted
    order, masked to the query's bucket, which the two-chunk window always
    contains). That set depends on past tokens only, so causality is exact:
    changing any future token changes no past output. The paper's rule (the
    query's chunk and the previous one, future keys masked) is not causal in
    this sense: where chunk boundaries fall in sorted order depends on the
    buckets of every token, future ones included, so replacing future tokens
    moved past outputs (by 2.5 at L=32 with 2 hashes). Bidirectional
    attention keeps the paper's rule.
  - Padding: padded tokens (mask False, and the internal padding up to a
    multiple of `chunk_size`) get bucket `num_buckets`, after every real
    bucket, so they sort to the end of every round and their keys are masked.
    The real tokens keep their relative order and fill the first chunks
    exactly as the real tokens alone would (padding anywhere, holes included),
    so what sits in padded positions cannot change a real token's output, and
    right padding gives the output of the unpadded sequence: appending
    padding changes no real output (the first chunk never looks back, and
    the rotations' shape does not depend on the length). That holds for one
    draw of rotations; the module draws afresh on every call, so two calls
    differ by their hashes whatever the padding (compare lengths from one
    stream state: `nnx.reseed`, or a copy of the module's state).
  - Randomness: the rotations come from an explicit `key` (pure function) or,
    in the module, from an `nnx.RngStream` tagged "dropout", drawn on every
    call. The training step reseeds the dropout streams from (seed, step), so
    every step hashes afresh and a resumed run repeats the same draws. The
    original LRA code hashed with a fixed random key; that defect is ruled out
    by the tests (different keys give different outputs; the module's output
    changes between calls). Unlike the LRA code, logits are divided (not
    multiplied) by sqrt(head_dim), padding is masked, and the module keeps
    its output projection.

Cost per head, with n = num_hashes, c = chunk_size, d = head_dim:
O(n L log L) for the sorts and O(n L 2c d) time, O(n L (2c + d)) memory for
the chunked attention, forward and backward. No [L, L] array is built.

`reformer_attention_weights` builds the [L, L] map of one draw of rotations (the
module's `attention_weights` maps those of its next call), for inspection at short
lengths (`attention.maps`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.masking import pad_to
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_fits_sequence, check_positive_int
from efficient_transformers.errors import ConfigError

_F32 = jnp.float32
SELF_LOGIT = -1e5  # a token's logit on itself: used only when nothing else is visible
INVISIBLE_LOGIT = -1e9  # padding, the future (causal), outside the sequence
_NORM_EPSILON = 1e-6


def _check_params(num_hashes, num_buckets, chunk_size) -> None:
  check_positive_int("reformer", "num_hashes", num_hashes)
  check_positive_int("reformer", "num_buckets", num_buckets, minimum=2)
  check_positive_int("reformer", "chunk_size", chunk_size)
  if num_buckets % 2:
    raise ConfigError(
      f"attention 'reformer': num_buckets={num_buckets} must be even (a token's bucket is the "
      "argmax over [xR, -xR]).",
      argument="attention_kwargs.num_buckets",
    )


def normalize_keys(q: jax.Array) -> jax.Array:
  """The shared keys: q / ||q|| along the last axis (with a small epsilon), float32."""
  q = q.astype(_F32)
  return q * jax.lax.rsqrt(jnp.sum(q * q, axis=-1, keepdims=True) + _NORM_EPSILON)


def hash_buckets(q: jax.Array, rotations: jax.Array) -> jax.Array:
  """LSH buckets argmax([xR, -xR]) of every token, head and round.

  Args:
    q: [batch, length, heads, head_dim].
    rotations: [heads, num_hashes, head_dim, num_buckets / 2].

  Returns:
    int32 [batch, heads, num_hashes, length] in [0, num_buckets).
  """
  rotated = jnp.einsum("blhd,hrdk->bhrlk", q.astype(_F32), rotations.astype(_F32))
  rotated = jax.lax.stop_gradient(rotated)
  return jnp.argmax(jnp.concatenate([rotated, -rotated], axis=-1), axis=-1).astype(jnp.int32)


def draw_rotations(
  key: jax.Array, heads: int, head_dim: int, num_hashes: int, num_buckets: int
) -> jax.Array:
  """Random Gaussian rotations R, independent per head and per round.

  Args:
    key: PRNG key.
    heads, head_dim: the attention's shape.
    num_hashes: rounds.
    num_buckets: buckets per round (even); R has num_buckets / 2 columns.

  Returns:
    [heads, num_hashes, head_dim, num_buckets / 2] float32.
  """
  return jax.random.normal(key, (heads, num_hashes, head_dim, num_buckets // 2), _F32)


def _gather(x: jax.Array, perm: jax.Array) -> jax.Array:
  """x [batch, heads, length, ...] gathered along length per round: [batch, heads, rounds, ...]."""
  idx = perm.reshape(*perm.shape, *([1] * (x.ndim - 3)))
  return jnp.take_along_axis(x[:, :, None], idx, axis=3)


def _with_previous_chunk(x: jax.Array, fill) -> jax.Array:
  """[..., num_chunks, c, ...] -> [..., num_chunks, 2c, ...]: the previous chunk, then this one.

  The first chunk's previous chunk is `fill` (outside the sequence).
  """
  axis = 3  # [batch, heads, rounds, num_chunks, c, ...]
  widths = [(0, 0)] * x.ndim
  widths[axis] = (1, 0)
  previous = jnp.pad(x, widths, constant_values=fill)[:, :, :, :-1]
  return jnp.concatenate([previous, x], axis=axis + 1)


def reformer_attention(
  q: jax.Array,
  v: jax.Array,
  *,
  key: jax.Array,
  mask: jax.Array | None = None,
  causal: bool = False,
  num_hashes: int = 2,
  num_buckets: int = 32,
  chunk_size: int = 64,
) -> jax.Array:
  """Shared-QK LSH attention (see the module docstring).

  A length that is not a multiple of `chunk_size` is padded internally; the
  padded tokens sort after every real one and are never seen. A `chunk_size`
  of at least the length with `num_hashes=1` is one chunk: exact shared-QK
  attention (with the self rule), whatever the hash.

  Args:
    q: [batch, length, heads, head_dim]; also the keys, after normalization.
    v: [batch, length, heads, head_dim].
    key: PRNG key of the random rotations.
    mask: [batch, length] bool, True = real token; or None.
    causal: query i sees only keys j <= i of its own bucket, at most
      `chunk_size` of them besides itself per round (exactly causal; see the
      module docstring).
    num_hashes: hashing rounds n.
    num_buckets: buckets per round (even).
    chunk_size: tokens per chunk c of the sorted sequence.

  Returns:
    [batch, length, heads, head_dim] in q's dtype (softmax in float32).
    Padded query rows are zeros.

  Raises:
    ConfigError: a size is not a positive integer, num_buckets is odd, or
      chunk_size > length.
  """
  _check_params(num_hashes, num_buckets, chunk_size)
  masking.check_qkv("reformer", q, q, v, mask)
  check_fits_sequence("reformer", "chunk_size", chunk_size, q.shape[1])
  rotations = draw_rotations(key, q.shape[2], q.shape[3], num_hashes, num_buckets)
  return reformer_attention_from_rotations(
    q, v, rotations, mask=mask, causal=causal, chunk_size=chunk_size
  )


def _check_rotations(rotations: jax.Array, q: jax.Array, chunk_size: int) -> int:
  """Checks rotations and chunk_size against q [batch, length, heads, head_dim]; the buckets.

  Raises:
    ValueError: rotations of the wrong shape; ConfigError: bad sizes (`_check_params`) or
      chunk_size > length.
  """
  _, length, heads, head_dim = q.shape
  if rotations.ndim != 4 or rotations.shape[0] != heads or rotations.shape[2] != head_dim:
    raise ValueError(
      f"reformer: rotations must be [heads={heads}, num_hashes, head_dim={head_dim}, "
      f"num_buckets / 2]; got {rotations.shape}."
    )
  num_buckets = 2 * rotations.shape[3]
  _check_params(rotations.shape[1], num_buckets, chunk_size)
  check_fits_sequence("reformer", "chunk_size", chunk_size, length)
  return num_buckets


def reformer_attention_from_rotations(
  q: jax.Array,
  v: jax.Array,
  rotations: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  chunk_size: int = 64,
) -> jax.Array:
  """`reformer_attention` with given rotations (from `draw_rotations`) instead of a key.

  Args:
    q, v, mask, causal, chunk_size: as in `reformer_attention`.
    rotations: [heads, num_hashes, head_dim, num_buckets / 2].

  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  masking.check_qkv("reformer", q, q, v, mask)
  batch, length, heads, head_dim = q.shape
  num_buckets = _check_rotations(rotations, q, chunk_size)
  c = chunk_size
  num_chunks = -(-length // c)
  padded = num_chunks * c

  real = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
  real = pad_to(real, padded)  # internal padding is not real
  qp, vp = pad_to(q, padded), pad_to(v, padded)

  buckets = hash_buckets(qp, rotations)  # [B, H, R, Lp]
  buckets = jnp.where(real[:, None, None, :], buckets, num_buckets)
  positions = jnp.arange(padded, dtype=jnp.int32)
  # Unique sort keys: (bucket, position); padded tokens last in every round.
  perm = jnp.argsort(buckets * padded + positions, axis=-1).astype(jnp.int32)
  unperm = jnp.argsort(perm, axis=-1).astype(jnp.int32)

  to_bh = lambda x: jnp.moveaxis(x, 2, 1)  # [B, Lp, H, ...] -> [B, H, Lp, ...]
  qs = _gather(to_bh(qp.astype(_F32)), perm)  # [B, H, R, Lp, D]
  vs = _gather(to_bh(vp), perm)
  pos_s = perm  # the sorted tokens' positions
  real_s = jnp.take_along_axis(jnp.broadcast_to(real[:, None, None, :], perm.shape), perm, axis=-1)

  chunked = lambda x: x.reshape(*x.shape[:3], num_chunks, c, *x.shape[4:])
  q_c = chunked(qs)  # [B, H, R, nc, c, D]
  k_w = _with_previous_chunk(chunked(normalize_keys(qs)), 0.0)  # [B, H, R, nc, 2c, D]
  v_w = _with_previous_chunk(chunked(vs), 0)
  q_pos = chunked(pos_s)  # [B, H, R, nc, c]
  k_pos = _with_previous_chunk(q_pos, -1)  # -1: outside the sequence
  k_real = _with_previous_chunk(chunked(real_s), False)

  logits = jnp.einsum("bhrnqd,bhrnkd->bhrnqk", q_c, k_w, preferred_element_type=_F32)
  logits = logits * (head_dim**-0.5)
  visible = k_real[..., None, :]
  if causal:
    # The query's bucket, its earlier tokens, at most c places back in sorted order.
    q_bucket = chunked(jnp.take_along_axis(buckets, perm, axis=-1))
    k_bucket = _with_previous_chunk(q_bucket, -1)
    q_index = chunked(jnp.broadcast_to(positions, perm.shape))  # the sorted order
    k_index = _with_previous_chunk(q_index, -padded - c)
    visible = (
      visible
      & (k_bucket[..., None, :] == q_bucket[..., :, None])
      & (k_pos[..., None, :] <= q_pos[..., :, None])
      & (k_index[..., None, :] >= q_index[..., :, None] - c)
    )
  logits = jnp.where(k_pos[..., None, :] == q_pos[..., :, None], SELF_LOGIT, logits)
  logits = jnp.where(visible, logits, INVISIBLE_LOGIT)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, H, R, nc, c]
  weights = jnp.exp(logits - lse[..., None])
  out = jnp.einsum("bhrnqk,bhrnkd->bhrnqd", weights.astype(v.dtype), v_w)

  # Back to positions, then combine the rounds by their log-sum-exps.
  out = _gather_rounds(out.reshape(*out.shape[:3], padded, head_dim), unperm)
  lse = jnp.take_along_axis(lse.reshape(*lse.shape[:3], padded), unperm, axis=-1)
  round_weights = jax.nn.softmax(lse, axis=2)  # [B, H, R, Lp]
  out = jnp.einsum("bhrl,bhrld->blhd", round_weights, out.astype(_F32))[:, :length]
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


def _gather_rounds(x: jax.Array, perm: jax.Array) -> jax.Array:
  """x [batch, heads, rounds, length, d] gathered along length by perm [b, h, rounds, length]."""
  return jnp.take_along_axis(x, perm[..., None], axis=3)


@maps.register_weights("reformer")
def reformer_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  rotations: jax.Array | None = None,
  key: jax.Array | None = None,
  num_hashes: int = 2,
  num_buckets: int = 32,
  chunk_size: int = 64,
) -> jax.Array:
  """The map [batch, heads, L, L] float32 of `reformer_attention_from_rotations`.

  Per round r, token i's softmax row over the keys its LSH window shows it (its chunk
  of the (bucket, position)-sorted sequence and the previous chunk; causal: its own
  bucket's earlier tokens, at most chunk_size back in sorted order), with the same
  self rule (SELF_LOGIT) and masking; the rounds are combined row by row with the
  weights softmax_r(lse_r), so a key two rounds show counts in both. Rows of real
  queries sum to 1; padded (and, causal, later) keys get zero weight; padded query rows
  are zero. Quadratic by nature; for inspection at short lengths (`attention.maps`).

  Args:
    q: [batch, length, heads, head_dim], the shared queries-keys (hashed).
    k: the keys before normalization; Reformer's are its queries: pass q.
    mask, causal, chunk_size: as in `reformer_attention`.
    max_length: the longest length to build a map for.
    rotations: [heads, num_hashes, head_dim, num_buckets / 2] (`draw_rotations`);
      None: drawn from `key` with num_hashes and num_buckets, as `reformer_attention`
      does.
  """
  maps.check_map_length("reformer", q.shape[1], k.shape[1], max_length)
  if k.shape != q.shape:
    raise ValueError(f"reformer: shared QK, k must be q's shape {q.shape}; got {k.shape}.")
  if rotations is None:
    if key is None:
      raise ValueError("reformer: pass the hash rotations (or a key to draw them from).")
    _check_params(num_hashes, num_buckets, chunk_size)
    rotations = draw_rotations(key, q.shape[2], q.shape[3], num_hashes, num_buckets)
  num_buckets = _check_rotations(rotations, q, chunk_size)
  length, c = q.shape[1], chunk_size
  real = jnp.ones(q.shape[:2], bool) if mask is None else mask.astype(bool)
  buckets = hash_buckets(q, rotations)  # [B, H, R, L]
  buckets = jnp.where(real[:, None, None, :], buckets, num_buckets)
  positions = jnp.arange(length, dtype=jnp.int32)
  # A token's place in its round's sorted order (padded tokens last, as in the kernel).
  rank = jnp.argsort(jnp.argsort(buckets * length + positions, axis=-1), axis=-1)
  rows, cols = (lambda x: x[..., :, None]), (lambda x: x[..., None, :])
  chunk = rank // c
  visible = (cols(chunk) == rows(chunk)) | (cols(chunk) == rows(chunk) - 1)
  visible = visible & real[:, None, None, None, :]
  if causal:
    visible = (
      visible
      & (cols(buckets) == rows(buckets))
      & (cols(positions) <= rows(positions))
      & (cols(rank) >= rows(rank) - c)
    )
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(_F32), normalize_keys(k))
  logits = logits * (q.shape[-1] ** -0.5)
  logits = jnp.where(jnp.eye(length, dtype=bool), SELF_LOGIT, logits)[:, :, None]
  logits = jnp.where(visible, logits, INVISIBLE_LOGIT)  # [B, H, R, L, L]
  lse = jax.nn.logsumexp(logits, axis=-1)
  weights = jnp.exp(logits - lse[..., None])
  weights = jnp.einsum("bhrq,bhrqk->bhqk", jax.nn.softmax(lse, axis=2), weights)
  if mask is not None:
    weights = jnp.where(real[:, None, :, None], weights, 0.0)  # Padded query rows.
  return weights


def _hash_stream(rngs: nnx.Rngs) -> nnx.RngStream:
  """A stream tagged "dropout" (so `nnx.reseed(model, dropout=...)` reaches it).

  Seeded from the `dropout` stream (or `default`, which `Rngs` falls back to);
  a Linen user initializing through `nnx.bridge` has only `params`, used then.
  """
  try:
    source = rngs.dropout
  except AttributeError:
    source = rngs.params
  return nnx.RngStream(source(), tag="dropout")


_DEFAULTS = defaults_of(reformer_attention)


@register("reformer")
class ReformerAttention(MultiHeadAttention):
  """Multi-head shared-QK LSH attention (see `reformer_attention`).

  Keys are the normalized queries, so the module has no key projection (it is
  removed after the base class builds it). The rotations are drawn from
  `self.hash_rngs` on every call, deterministic or not.

  Variant kwargs:
    num_hashes: hashing rounds (default 2).
    num_buckets: buckets per round, even (default 32).
    chunk_size: tokens per chunk of the sorted sequence (default 64).
  """

  def __init__(
    self,
    *,
    num_hashes: int = _DEFAULTS.num_hashes,
    num_buckets: int = _DEFAULTS.num_buckets,
    chunk_size: int = _DEFAULTS.chunk_size,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    _check_params(num_hashes, num_buckets, chunk_size)
    super().__init__(**common)
    del self.key  # shared QK: the keys are the normalized queries
    self.num_hashes = num_hashes
    self.num_buckets = num_buckets
    self.chunk_size = chunk_size
    self.hash_rngs = _hash_stream(common["rngs"])

  def attend(self, q, k, v, *, mask, deterministic):
    del k, deterministic  # shared QK; hashing is random in eval too
    return reformer_attention(
      q,
      v,
      key=self.hash_rngs(),
      mask=mask,
      causal=self.causal,
      num_hashes=self.num_hashes,
      num_buckets=self.num_buckets,
      chunk_size=self.chunk_size,
    )

  def next_rotations(self) -> jax.Array:
    """The rotations [heads, num_hashes, head_dim, num_buckets / 2] of the next call.

    Drawn from a copy of `hash_rngs`, so the stream is not advanced: the next forward
    call draws these same rotations.
    """
    key = nnx.clone(self.hash_rngs)()
    return draw_rotations(key, self.num_heads, self.head_dim, self.num_hashes, self.num_buckets)

  def map_params(self) -> dict:
    return {"rotations": self.next_rotations(), "chunk_size": self.chunk_size}

  def attention_weights(
    self,
    x: jax.Array,
    *,
    mask: jax.Array | None = None,
    max_length: int = maps.MAX_MAP_LENGTH,
    rotations: jax.Array | None = None,
  ) -> jax.Array:
    """The map [batch, heads, L, L] of the module's self-attention over x (shared QK).

    Args:
      x, mask, max_length: as in `MultiHeadAttention.attention_weights`.
      rotations: the hash rotations to map; None = those the module's NEXT call will
        draw (`next_rotations`; the stream is not advanced), so the map followed by
        `self(x, mask=mask)` reproduces that call exactly.
    """
    maps.check_map_length("reformer", x.shape[1], x.shape[1], max_length)
    q = self.rotate(self.query(x))  # The keys are the normalized queries.
    params = self.map_params()
    if rotations is not None:
      params["rotations"] = rotations
    return maps.attention_weights(
      "reformer", q, q, mask=mask, causal=self.causal, max_length=max_length, **params
    )

  def _self_attention(
    self, x: jax.Array, *, mask: jax.Array | None, deterministic: bool
  ) -> jax.Array:
    """Self-attention over `x` [batch, length, in_features]; returns the same shape."""
    # RoPE on the shared queries rotates the keys too (they are the normalized queries).
    q, v = self.rotate(self.query(x)), self.value(x)
    out = self.attend(q, None, v, mask=mask, deterministic=deterministic)
    out = self.dropout(out, deterministic=deterministic)
    return self.out(out)
