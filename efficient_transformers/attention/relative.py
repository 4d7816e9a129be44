"""Relative-position attention of Transformer-XL (Dai et al., 2019), as pure functions.

A query at absolute position `mlen + i` of the concatenation [memory; segment]
scores a key at position `j` by

  (q_i + u) . k_j   +   (q_i + v) . r_{(mlen + i) - j}

where r_d is the (projected) encoding of the relative distance d and u, v are
learned per-head biases. The distance term is computed for all (query, encoding)
pairs as one [qlen, klen] matmul and moved into place by `relative_shift`, a
pad-reshape-slice that builds no gather indices.

Shapes:
  q:        [batch, qlen, heads, head_dim]
  k, v:     [batch, klen, heads, head_dim]   (klen = mlen + qlen)
  r:        [klen, heads, head_dim]           distances klen-1, ..., 1, 0
  u, v_bias:[heads, head_dim]
  mask:     [batch, klen] bool, True = real key
"""

import jax
import jax.numpy as jnp

from efficient_transformers.attention import masking
from efficient_transformers.layers.embedding import sinusoidal_table


def sinusoidal_relative_encoding(
  klen: int, features: int, *, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
  """Sinusoids of the relative distances klen-1, ..., 1, 0, in that (descending) order.

  Row c encodes distance klen - 1 - c, the order `relative_shift` expects.

  Returns:
    [klen, features], a compile-time constant.
  """
  table = sinusoidal_table(klen, features)[::-1]
  return jnp.asarray(table.copy(), dtype)


def relative_shift(x: jax.Array) -> jax.Array:
  """Moves distance-indexed scores into key-indexed place.

  Args:
    x: [..., qlen, klen] scores where column c belongs to distance klen - 1 - c.

  Returns:
    [..., qlen, klen] with out[..., i, j] = x[..., i, j + qlen - 1 - i] for every
    j <= mlen + i (mlen = klen - qlen), i.e. the score of the distance between
    query i and key j. Entries with j > mlen + i (keys in the query's future) hold
    unrelated finite values; the causal mask must remove them.
  """
  *lead, qlen, klen = x.shape
  # Prepending one zero column and re-reading the rows with stride klen (instead of
  # klen + 1) slides row i left by qlen - 1 - i places: the shift of Dai et al.
  padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
  flat = padded.reshape(*lead, qlen * (klen + 1))
  return flat[..., qlen:].reshape(*lead, qlen, klen)


def relative_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  r: jax.Array,
  u: jax.Array,
  v_bias: jax.Array,
  *,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Transformer-XL attention of a segment's queries over [memory; segment] keys.

  Always causal: query i (absolute position mlen + i) sees keys j <= mlen + i,
  since `r` holds non-negative distances only.

  Args:
    q: [batch, qlen, heads, head_dim], the segment's queries.
    k, v: [batch, klen, heads, head_dim], keys/values of [memory; segment]; the
      last qlen keys are the segment itself, so query i sits at position mlen + i.
    r: [klen, heads, head_dim], projected encodings of distances klen-1 ... 0.
    u: [heads, head_dim], the content bias.
    v_bias: [heads, head_dim], the position bias.
    mask: [batch, klen] bool, True = real key (memory slots in use, real tokens).

  Returns:
    [batch, qlen, heads, head_dim] in q's dtype, softmax in float32 with scale
    1/sqrt(head_dim). Rows with no visible key are zeros, never NaN.
  """
  masking.check_qkv("relative_attention", q, k, v, mask)
  qlen, klen = q.shape[1], k.shape[1]
  if klen < qlen:
    raise ValueError(f"relative_attention: klen={klen} must be >= qlen={qlen}.")
  if r.shape != (klen, *q.shape[2:]):
    raise ValueError(f"relative_attention: r must be {(klen, *q.shape[2:])}; got {r.shape}.")
  scale = q.shape[-1] ** -0.5
  content = jnp.einsum(
    "bqhd,bkhd->bhqk", q + u.astype(q.dtype), k, preferred_element_type=jnp.float32
  )
  position = jnp.einsum(
    "bqhd,khd->bhqk",
    q + v_bias.astype(q.dtype),
    r.astype(q.dtype),
    preferred_element_type=jnp.float32,
  )
  logits = (content + relative_shift(position)) * scale
  keep = masking.logits_bias(mask, q_length=qlen, kv_length=klen, causal=True, q_offset=klen - qlen)
  logits = jnp.where(keep, logits, masking.large_negative(jnp.float32))
  weights = jax.nn.softmax(logits, axis=-1)
  # A row with no visible key (empty memory, padded first token) would average
  # every value uniformly; make it zero instead.
  weights = jnp.where(keep.any(axis=-1, keepdims=True), weights, 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
  return out.astype(q.dtype)
