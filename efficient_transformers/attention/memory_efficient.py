"""Exact attention in O(L) memory: chunked, with a streaming softmax, in pure JAX.

Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory" (2021); the
backward pass follows FlashAttention-2 (Dao, 2023). Queries and keys are cut
into chunks; for each query chunk the keys are streamed through a running
(max, sum, weighted-value) triple, so no more than one
[query_chunk, key_chunk] block of logits exists at a time. A `jax.custom_vjp`
saves only q, k, v, the output and the per-row logsumexp, and the backward
pass recomputes each block of logits, so training is O(L) memory as well
(plain autodiff through the loops would store every block: O(L^2) again).

Loops are `lax.fori_loop`, so the same code runs on CPU, GPU and TPU; it is
the exact-attention fallback wherever no fused kernel exists. Cost:
O(L^2 d) time, O(L d + chunk^2) memory per head.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from efficient_transformers.attention import maps, masking, softmax
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_positive_int
from efficient_transformers.layers import positions

_F32 = jnp.float32


def check_chunk_size(name: str, value) -> None:
  """Raises ConfigError unless `value` is a positive int; `name` is the parameter."""
  check_positive_int("memory_efficient", name, value)


def _chunk(x: jax.Array, index: jax.Array, size: int, axis: int) -> jax.Array:
  return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _block_keep(keep, i, j, q_chunk, k_chunk, causal):
  """Keep-mask [batch, 1, q_chunk, k_chunk] of block (i, j); keep: [batch, kv_len].

  `causal` here and below: None (not causal) or the key position of query 0.
  """
  return masking.logits_bias(
    _chunk(keep, j, k_chunk, axis=1),
    q_length=q_chunk,
    kv_length=k_chunk,
    causal=causal is not None,
    q_offset=(causal or 0) + i * q_chunk,
    kv_offset=j * k_chunk,
  )


def _block_logits(qi: jax.Array, kj: jax.Array, i, j, alibi, *, keys_first=False) -> jax.Array:
  """Scaled logits [batch, heads, q_chunk, k_chunk] of block (i, j) in float32; with
  `keys_first`, their transpose [batch, heads, k_chunk, q_chunk]. qi, kj heads-major.

  `alibi`: None, or (slopes as a tuple of floats, the key position of query 0)
  for ALiBi's bias -slope_h |query position - key position|.
  """
  if keys_first:
    s = jnp.einsum("bhkd,bhqd->bhkq", kj, qi, preferred_element_type=_F32)
  else:
    s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=_F32)
  s = s * (qi.shape[-1] ** -0.5)
  if alibi is not None:
    slopes, shift = alibi
    q_pos = shift + i * qi.shape[2] + jnp.arange(qi.shape[2])
    k_pos = j * kj.shape[2] + jnp.arange(kj.shape[2])
    rows, cols = (k_pos, q_pos) if keys_first else (q_pos, k_pos)
    # The bias depends on |query - key| only: the same function either way round.
    s = s + positions.alibi_bias(jnp.asarray(slopes, _F32), rows[:, None], cols[None, :])[None]
  return s


def _key_chunks_seen(i, num_k_chunks, q_chunk, k_chunk, causal):
  """How many leading key chunks query chunk i can see: causal skips the rest."""
  if causal is None:
    return num_k_chunks
  last_query = causal + (i + 1) * q_chunk - 1
  return jnp.minimum(num_k_chunks, last_query // k_chunk + 1)


# The kernels below take q, k, v as [batch, length, heads, d] and work on each chunk
# heads-major ([batch, heads, chunk, d], `_heads_chunk`): every block product is then a
# plain batched matrix product whose output is already in its accumulator's layout, so
# XLA transposes no [q_chunk, k_chunk] block, only [chunk, d] ones.


def _heads_chunk(x: jax.Array, index: jax.Array, size: int) -> jax.Array:
  """Chunk `index` of x [B, L, H, D] along L, heads-major: [B, H, size, D]."""
  return _chunk(x, index, size, axis=1).transpose(0, 2, 1, 3)


def _forward(q, k, v, keep, causal, q_chunk, k_chunk, alibi):
  """Returns out [B, Lq, H, D] (q's dtype) and logsumexp [B, H, Lq] (float32)."""
  batch, q_len, heads, dim = q.shape
  num_q, num_k = q_len // q_chunk, k.shape[1] // k_chunk

  def query_block(i, carry):
    out, lse = carry
    qi = _heads_chunk(q, i, q_chunk)

    def key_block(j, state):
      m, total, acc = state
      s = _block_logits(qi, _heads_chunk(k, j, k_chunk), i, j, alibi)
      s = jnp.where(_block_keep(keep, i, j, q_chunk, k_chunk, causal), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=-1))
      # While a row has seen no key its max is -inf; shifting by 0 instead
      # keeps exp() at exactly 0 for it rather than NaN.
      m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      rescale = jnp.exp(m - m_safe)
      total = total * rescale + p.sum(axis=-1)
      pv = jnp.einsum(
        "bhqk,bhkd->bhqd",
        p.astype(v.dtype),
        _heads_chunk(v, j, k_chunk),
        preferred_element_type=_F32,
      )
      return m_new, total, acc * rescale[..., None] + pv

    init = (
      jnp.full((batch, heads, q_chunk), -jnp.inf, _F32),
      jnp.zeros((batch, heads, q_chunk), _F32),
      jnp.zeros((batch, heads, q_chunk, dim), _F32),
    )
    end = _key_chunks_seen(i, num_k, q_chunk, k_chunk, causal)
    m, total, acc = lax.fori_loop(0, end, key_block, init)
    seen = total > 0
    # A row with no visible key gets output 0; its logsumexp is never read
    # (the backward pass masks by `keep` too), 0 just keeps it finite.
    l_safe = jnp.where(seen, total, 1.0)
    oi = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0)
    li = jnp.where(seen, m + jnp.log(l_safe), 0.0)
    oi = oi.transpose(0, 2, 1, 3).astype(out.dtype)  # -> [B, q_chunk, H, D]
    out = lax.dynamic_update_slice_in_dim(out, oi, i * q_chunk, axis=1)
    lse = lax.dynamic_update_slice_in_dim(lse, li, i * q_chunk, axis=2)
    return out, lse

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((batch, heads, q_len), _F32))
  return lax.fori_loop(0, num_q, query_block, init)


def _backward(q, k, v, keep, out, lse, dout, causal, q_chunk, k_chunk, alibi):
  """FlashAttention-2 backward: outer loop over key chunks, inner over query chunks.

  Each block is computed keys-first ([k_chunk, q_chunk]): dv = p^T dout and dk = ds^T q
  read it as it is, and dq accumulates transposed ([B, H, D, Lq]: dq^T = k^T ds^T, in
  float32 as before), so no block is transposed. Queries-first, XLA transposed the ds
  block for dk in every iteration (measured: 40% of the backward on CPU).
  """
  batch, q_len, heads, dim = q.shape
  num_q, num_k = q_len // q_chunk, k.shape[1] // k_chunk
  # delta_i = sum_d dout_id * out_id = sum_j p_ij dp_ij: the softmax Jacobian term.
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(_F32), out.astype(_F32))
  chunk_shape = (batch, heads, k_chunk, dim)
  scale = q.shape[-1] ** -0.5

  def key_block(j, carry):
    dq_t, dk, dv = carry
    kj = _heads_chunk(k, j, k_chunk)
    vj = _heads_chunk(v, j, k_chunk)

    def query_block(i, state):
      dq_t, dkj, dvj = state
      qi = _heads_chunk(q, i, q_chunk)
      doi = _heads_chunk(dout, i, q_chunk)
      s = _block_logits(qi, kj, i, j, alibi, keys_first=True)
      s = s - _chunk(lse, i, q_chunk, axis=2)[..., None, :]
      keep_ij = _block_keep(keep, i, j, q_chunk, k_chunk, causal).swapaxes(-1, -2)
      p = jnp.exp(jnp.where(keep_ij, s, -jnp.inf))  # the forward's probabilities, transposed
      dvj = dvj + jnp.einsum(
        "bhkq,bhqd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=_F32
      )
      dp = jnp.einsum("bhkd,bhqd->bhkq", vj, doi, preferred_element_type=_F32)
      ds = p * (dp - _chunk(delta, i, q_chunk, axis=2)[..., None, :]) * scale
      dkj = dkj + jnp.einsum(
        "bhkq,bhqd->bhkd", ds.astype(qi.dtype), qi, preferred_element_type=_F32
      )
      dqi_t = jnp.einsum("bhkd,bhkq->bhdq", kj, ds.astype(kj.dtype), preferred_element_type=_F32)
      dq_t = lax.dynamic_update_slice_in_dim(
        dq_t, _chunk(dq_t, i, q_chunk, axis=3) + dqi_t, i * q_chunk, axis=3
      )
      return dq_t, dkj, dvj

    # Causal: query chunks wholly before this key chunk cannot see it.
    start = jnp.maximum(0, (j * k_chunk - causal) // q_chunk) if causal is not None else 0
    init = (dq_t, jnp.zeros(chunk_shape, _F32), jnp.zeros(chunk_shape, _F32))
    dq_t, dkj, dvj = lax.fori_loop(start, num_q, query_block, init)
    dkj, dvj = (x.transpose(0, 2, 1, 3).astype(k.dtype) for x in (dkj, dvj))  # [B, kc, H, D]
    dk = lax.dynamic_update_slice_in_dim(dk, dkj, j * k_chunk, axis=1)
    dv = lax.dynamic_update_slice_in_dim(dv, dvj, j * k_chunk, axis=1)
    return dq_t, dk, dv

  dq_t = jnp.zeros((batch, heads, dim, q_len), _F32)
  init = (dq_t, jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
  dq_t, dk, dv = lax.fori_loop(0, num_k, key_block, init)
  return dq_t.transpose(0, 3, 1, 2).astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_attention(q, k, v, keep, causal, q_chunk, k_chunk, alibi):
  """Lengths must be multiples of the chunk sizes; `keep` [B, Lk] masks keys."""
  return _forward(q, k, v, keep, causal, q_chunk, k_chunk, alibi)[0]


def _chunked_attention_fwd(q, k, v, keep, causal, q_chunk, k_chunk, alibi):
  out, lse = _forward(q, k, v, keep, causal, q_chunk, k_chunk, alibi)
  return out, (q, k, v, keep, out, lse)


def _chunked_attention_bwd(causal, q_chunk, k_chunk, alibi, residuals, dout):
  q, k, v, keep, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, keep, out, lse, dout, causal, q_chunk, k_chunk, alibi)
  return dq, dk, dv, None  # the boolean mask has no gradient


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


def _pad_length(x: jax.Array, multiple: int) -> jax.Array:
  extra = -x.shape[1] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, extra)
  return jnp.pad(x, widths)


def memory_efficient_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  query_chunk_size: int = 512,
  key_chunk_size: int = 512,
  alibi_slopes=None,
  q_offset: int = 0,
) -> jax.Array:
  """Exact softmax attention, chunked, in O(L) memory forward and backward.

  Chunk sizes are clipped to the sequence lengths. A length that is not a
  multiple of its chunk size is padded internally up to the next multiple;
  padded keys are masked out and padded query rows are dropped, so the result
  is exact for any length.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; any pattern; or None.
    causal: query i sees keys j <= i only; key chunks wholly in the future of
      a query chunk are skipped, not just masked.
    query_chunk_size: queries per chunk.
    key_chunk_size: keys per chunk; the peak extra memory is one
      [batch, heads, query_chunk_size, key_chunk_size] float32 block.
    alibi_slopes: None, or ALiBi's per-head slopes [heads] (concrete values,
      e.g. `positions.alibi_slopes(heads)`): adds -slope_h |i - j| to the
      logits block by block, query i at key position i + kv_length - q_length.
    q_offset: the key position of query 0 (a context of that many keys before
      the queries); causal: query i sees keys j <= q_offset + i.

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype (accumulated in float32).
    Rows of padded queries (self-attention) and rows with no visible key are
    zeros.

  Raises:
    ConfigError: a chunk size is not a positive integer.
  """
  check_chunk_size("query_chunk_size", query_chunk_size)
  check_chunk_size("key_chunk_size", key_chunk_size)
  masking.check_qkv("memory_efficient", q, k, v, mask)
  batch, q_length = q.shape[:2]
  kv_length = k.shape[1]
  q_chunk = min(query_chunk_size, q_length)
  k_chunk = min(key_chunk_size, kv_length)

  keep = jnp.ones((batch, kv_length), bool) if mask is None else mask.astype(bool)
  # Padding keys are False in `keep`: they are masked exactly like user padding.
  out = _chunked_attention(
    _pad_length(q, q_chunk),
    _pad_length(k, k_chunk),
    _pad_length(v, k_chunk),
    _pad_length(keep, k_chunk),
    int(q_offset) if causal else None,
    q_chunk,
    k_chunk,
    None if alibi_slopes is None else (tuple(map(float, alibi_slopes)), kv_length - q_length),
  )[:, :q_length]
  return masking.zero_padded_queries(out, mask)


@maps.register_weights("memory_efficient")
def memory_efficient_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  query_chunk_size: int = 512,
  key_chunk_size: int = 512,
  alibi_slopes=None,
  q_offset: int = 0,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `memory_efficient_attention` (its
  arguments).

  Exact attention: the softmax probabilities (`softmax.softmax_attention_weights`),
  which the chunks compute block by block; the chunk sizes are checked, not used.
  Quadratic by nature; for inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length("memory_efficient", q.shape[1], k.shape[1], max_length)
  check_chunk_size("query_chunk_size", query_chunk_size)
  check_chunk_size("key_chunk_size", key_chunk_size)
  return softmax.softmax_attention_weights(
    q,
    k,
    mask=mask,
    causal=causal,
    max_length=max_length,
    alibi_slopes=None if alibi_slopes is None else jnp.asarray(alibi_slopes, _F32),
    q_offset=q_offset,
  )


_DEFAULTS = defaults_of(memory_efficient_attention)


@register("memory_efficient")
class MemoryEfficientAttention(MultiHeadAttention):
  """Multi-head exact attention, chunked to O(L) memory (pure JAX, any backend).

  Takes position="alibi" (the bias is computed per block, never [L, L]).

  Variant kwargs:
    query_chunk_size: queries per chunk (default 512).
    key_chunk_size: keys per chunk (default 512).
  """

  def __init__(
    self,
    *,
    query_chunk_size: int = _DEFAULTS.query_chunk_size,
    key_chunk_size: int = _DEFAULTS.key_chunk_size,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    check_chunk_size("query_chunk_size", query_chunk_size)
    check_chunk_size("key_chunk_size", key_chunk_size)
    super().__init__(**common)
    self.query_chunk_size = query_chunk_size
    self.key_chunk_size = key_chunk_size

  supports_alibi = True

  def alibi_slopes_values(self):
    """The slopes as concrete numpy values (they become static block constants)."""
    return None if self.position_kind != "alibi" else positions.alibi_slopes(self.num_heads)

  context_queries = True

  def attend(self, q, k, v, *, mask, deterministic, q_offset=0):
    del deterministic
    return memory_efficient_attention(
      q, k, v, mask=mask, causal=self.causal, q_offset=q_offset, **self.map_params()
    )

  def map_params(self) -> dict:
    return dict(
      query_chunk_size=self.query_chunk_size,
      key_chunk_size=self.key_chunk_size,
      alibi_slopes=self.alibi_slopes_values(),
    )
