"""Shared pieces of the attention tests: an independent dense reference, inputs, runners.

`dense_attention` is written from the definition (explicit einsum, -inf
masking) and never calls the library's masking helpers, so a variant that
matches it is pinned to exact softmax attention, optionally restricted to a
boolean pattern. The [L, L] arrays it builds are allowed here: it is a test
oracle, never a kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

BATCH, HEADS, HEAD_DIM = 2, 2, 8


def dense_attention(q, k, v, *, mask=None, causal=False, pattern=None, scale=None, bias=None):
  """softmax(q k^T * scale) v over allowed keys; rows with no key and padded queries are 0.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
    mask: [batch, kv_len] bool key padding (True = real) or None. For
      self-attention (q_len == kv_len) it also zeroes padded query rows.
    causal: query i sees keys j <= i only.
    pattern: a boolean [q_len, kv_len] (or [heads, q_len, kv_len], or
      [batch, heads, q_len, kv_len]) of allowed pairs, or None for all.
    scale: logit scale; default 1/sqrt(head_dim).
    bias: an additive logit term broadcastable to [batch, heads, q_len, kv_len], or None.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  q_len, kv_len = q.shape[1], k.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  keep = np.ones((1, 1, q_len, kv_len), bool)
  if causal:
    keep = keep & np.tril(np.ones((q_len, kv_len), bool))
  if pattern is not None:
    pattern = np.asarray(pattern, bool)
    keep = keep & pattern.reshape((1,) * (4 - pattern.ndim) + pattern.shape)
  keep = jnp.asarray(keep)
  if mask is not None:
    keep = keep & mask[:, None, None, :]
  row_max = jnp.where(keep, logits, -jnp.inf).max(axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  # The inner where keeps exp's gradient finite at masked entries.
  e = jnp.where(keep, jnp.exp(jnp.where(keep, logits - row_max, 0.0)), 0.0)
  denom = e.sum(axis=-1, keepdims=True)
  out = jnp.einsum("bhqk,bkhd->bqhd", e / jnp.where(denom > 0, denom, 1.0), v)
  if mask is not None and q_len == kv_len:
    out = jnp.where(mask[:, :, None, None], out, 0.0)
  return out


def random_qkv(seed, q_len, kv_len=None, *, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM):
  """Standard-normal float32 q [batch, q_len, heads, head_dim], k and v [.., kv_len, ..]."""
  kv_len = q_len if kv_len is None else kv_len
  rng = np.random.default_rng(seed)
  shapes = [(batch, n, heads, head_dim) for n in (q_len, kv_len, kv_len)]
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def make_mask(kind, length, *, seed=0):
  """A [2, length] key-padding mask: None, 'right_padding' (11 pads in row 1), or 'random'.

  'random' has holes anywhere, including a padded first key (an empty causal
  first row) and at least one real key per row.
  """
  if kind == "none":
    return None
  if kind == "right_padding":
    return jnp.asarray(np.arange(length)[None, :] < np.array([[length], [length - 11]]))
  mask = np.random.default_rng(seed).random((BATCH, length)) < 0.6
  mask[:, 0] = False
  mask[:, 5] = True
  return jnp.asarray(mask)


def cotangent(out):
  """Fixed weights [heads, head_dim] broadcast over `out`, for the gradient of a weighted sum.

  A numpy constant (faster to compile than jax.random), equal for every dtype.
  """
  weights = np.random.default_rng(7).standard_normal(out.shape[2:]).astype(np.float32)
  return jnp.broadcast_to(jnp.asarray(weights).astype(out.dtype), out.shape)


@functools.cache
def output_and_grads_fn(fn, causal):
  """A jitted (q, k, v, mask) -> (output, grads w.r.t. q, k, v of a weighted sum of it).

  Cached per (fn, causal) so tests with equal shapes share one compilation;
  distinct weights per output entry keep the gradients from being trivial.
  """

  @jax.jit
  def run(q, k, v, mask):
    out, vjp = jax.vjp(lambda *qkv: fn(*qkv, mask=mask, causal=causal), q, k, v)
    return out, vjp(cotangent(out))

  return run


def _replace_where(qkv, where, seed):
  """q, k, v with the positions where `where` [batch or 1, length] holds replaced by noise."""
  q, k = qkv[0], qkv[1]
  batch, q_len, heads, head_dim = q.shape
  junk = random_qkv(seed, q_len, k.shape[1], batch=batch, heads=heads, head_dim=head_dim)
  where = np.asarray(where)[:, :, None, None]
  return tuple(jnp.where(where, j, x) for x, j in zip(qkv, junk, strict=True))


def replace_padded(qkv, mask, seed):
  """q, k, v with every padded position (mask False) replaced by fresh random values."""
  return _replace_where(qkv, ~np.asarray(mask), seed)


def append_padding(arrays, mask, new_length, seed):
  """`arrays` [batch, length, ...] and `mask` [batch, length] with padding appended.

  The appended positions (length .. new_length - 1) are padding (mask False)
  holding fresh standard-normal values, not zeros, so a variant that reads
  padded content there would show it.

  Returns:
    (tuple of arrays [batch, new_length, ...], mask [batch, new_length]).
  """
  rng = np.random.default_rng(seed)
  mask = np.asarray(mask)
  extra = new_length - mask.shape[1]
  out = []
  for x in arrays:
    junk = rng.standard_normal((x.shape[0], extra, *x.shape[2:])).astype(np.float32)
    out.append(jnp.concatenate([x, jnp.asarray(junk, x.dtype)], axis=1))
  padded = np.concatenate([mask, np.zeros((mask.shape[0], extra), bool)], axis=1)
  return tuple(out), jnp.asarray(padded)


def replace_future(qkv, position, seed):
  """q, k, v with every position > `position` replaced by fresh random values."""
  return _replace_where(qkv, np.arange(qkv[0].shape[1])[None, :] > position, seed)


@functools.cache
def train_temp_bytes(fn, length, causal=False, *, heads=1, head_dim=16):
  """Compiled temp memory of grad(sum(fn(q, k, v))) w.r.t. q, k, v at `length`; nothing runs."""
  x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  loss = lambda q, k, v, m: fn(q, k, v, mask=m, causal=causal).sum()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, mask).compile()
  return compiled.memory_analysis().temp_size_in_bytes
