"""Linformer: softmax attention over keys and values projected to a fixed length.

Wang et al., "Linformer: Self-Attention with Linear Complexity" (2020).
Learned projections E, F ([max_length, k]) compress the length axis of the
keys and values, K' = E^T K and V' = F^T V ([k, head_dim] per head), and each
query attends over those k projected keys: softmax(q K'^T / sqrt(d)) V'.
Cost: O(L k d) time and O(L k) memory per head; no [L, L] array exists.

Padding (the original LRA code ignores it): padded rows of K and V are zeroed
before projecting, so K' and V' are sums over real tokens only and the content
under the padding cannot reach the output. The projection is not renormalized
for the number of real tokens: a short sequence simply sums fewer rows of E
(its first rows, at the real positions), which is the only way padding changes
the result (scale of K', V'). A projected slot to which no real token
contributes (every E and F weight at real positions exactly 0: e.g. the
identity projection at a padded position) is empty and is masked like a padded
key; with learned dense projections no slot is empty. This is what makes
k = L, E = F = identity exactly softmax attention, padding included.

Not supported: causal attention (a length projection mixes future tokens into
every slot), and sharing E, F across layers (a model-level concern: each
module owns its projections).

`linformer_attention_weights` builds the [L, L] map softmax(q (E^T k)^T) F^T over
the original kv positions, for inspection at short lengths (`attention.maps`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_not_causal, check_positive_int
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers.partitioning import param_axes

_F32 = jnp.float32
_NOT_CAUSAL = "the length projection mixes future tokens into every projected key"


def _project(x: jax.Array, proj: jax.Array) -> jax.Array:
  """[batch, length, heads, d] x [(heads,) length, k] -> [batch, k, heads, d] (float32)."""
  if proj.ndim == 2:
    return jnp.einsum("blhd,lk->bkhd", x, proj, preferred_element_type=_F32)
  return jnp.einsum("blhd,hlk->bkhd", x, proj, preferred_element_type=_F32)


def _used_slots(mask: jax.Array, proj: jax.Array) -> jax.Array:
  """Whether any real token contributes to each slot: [batch, heads or 1, k] bool."""
  nonzero = (proj != 0).astype(_F32)
  real = mask.astype(_F32)
  if proj.ndim == 2:
    return (jnp.einsum("bl,lk->bk", real, nonzero) > 0)[:, None, :]
  return jnp.einsum("bl,hlk->bhk", real, nonzero) > 0


def _projections(
  key_projection: jax.Array, value_projection: jax.Array | None, q: jax.Array, k: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """E and F (F = E if None), checked against q and k and cut to their first kv_length rows.

  Raises:
    ValueError: bad projection shapes; ConfigError: kv_length > max_length (E's rows).
  """
  e = key_projection
  f = e if value_projection is None else value_projection
  if e.ndim not in (2, 3) or e.shape != f.shape:
    raise ValueError(
      f"linformer: projections must be [max_length, k] or [heads, max_length, k], "
      f"equal shapes; got {e.shape} and {f.shape}."
    )
  if e.ndim == 3 and e.shape[0] != q.shape[2]:
    raise ValueError(f"linformer: per-head projections {e.shape} for {q.shape[2]} heads.")
  kv_length, max_length = k.shape[1], e.shape[-2]
  if kv_length > max_length:
    raise ConfigError(
      f"attention 'linformer': input length {kv_length} exceeds max_length={max_length}; "
      "raise it to at least the sequence length.",
      argument="attention_kwargs.max_length",
    )
  return e[..., :kv_length, :], f[..., :kv_length, :]


def _slot_weights(
  q: jax.Array, k: jax.Array, e: jax.Array, f: jax.Array, mask: jax.Array | None
) -> jax.Array:
  """softmax(q (E^T k)^T / sqrt(d)) over the projected slots: [batch, heads, q_len, proj].

  Padded rows of k are zeroed before projecting; slots no real token reaches (through E or
  F) are masked, and a row with none left is zero.
  """
  if mask is not None:
    k = jnp.where(mask[:, :, None, None], k, jnp.zeros((), k.dtype))
  k_proj = _project(k, e.astype(k.dtype))  # [batch, proj, heads, head_dim]
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(_F32), k_proj) * scale
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  # [batch, heads or 1, 1, proj]: slots some real token contributes to.
  keep = (_used_slots(mask, e) | _used_slots(mask, f))[:, :, None, :]
  logits = jnp.where(keep, logits, masking.large_negative(_F32))
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.where(keep.any(axis=-1, keepdims=True), weights, 0.0)


def linformer_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  key_projection: jax.Array,
  value_projection: jax.Array | None = None,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
) -> jax.Array:
  """softmax(q (E^T k)^T / sqrt(d)) (F^T v), with padded keys excluded.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    key_projection: E, [max_length, proj] (shared by all heads) or
      [heads, max_length, proj] (one per head); its first kv_length rows are used.
    value_projection: F, same shape as E; None = E (shared key/value projection).
    mask: [batch, kv_length] bool, True = real token; or None.
    causal: must be False (Linformer is not causal).

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype (computed in float32).
    Padded query rows (self-attention) and rows with no real key are zeros.

  Raises:
    ConfigError: causal=True, or kv_length > max_length (E's rows).
  """
  check_not_causal("linformer", causal, _NOT_CAUSAL)
  masking.check_qkv("linformer", q, k, v, mask)
  e, f = _projections(key_projection, value_projection, q, k)
  if mask is not None:
    v = jnp.where(mask[:, :, None, None], v, jnp.zeros((), v.dtype))
  weights = _slot_weights(q, k, e, f, mask)
  v_proj = _project(v, f.astype(v.dtype))
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v_proj)
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


@maps.register_weights("linformer")
def linformer_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  key_projection: jax.Array,
  value_projection: jax.Array | None = None,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `linformer_attention` (its arguments).

  softmax(q (E^T k)^T / sqrt(d)) F^T: the weights over the projected slots (the same
  masking of padded keys and empty slots) carried back to the original kv positions
  through F, whose rows at padded positions are zeroed (padded values never enter
  F^T v). Rows are not normalised over keys (F is no average); padded keys get zero
  weight and padded query rows (self-attention) are zero. `max_length` bounds the map,
  not E's rows. Quadratic by nature; for inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length("linformer", q.shape[1], k.shape[1], max_length)
  check_not_causal("linformer", causal, _NOT_CAUSAL)
  e, f = _projections(key_projection, value_projection, q, k)
  weights = _slot_weights(q, k, e, f, mask)  # [batch, heads, q_len, proj]
  f = f.astype(_F32)
  if f.ndim == 2:
    weights = jnp.einsum("bhqs,ls->bhql", weights, f)
  else:
    weights = jnp.einsum("bhqs,hls->bhql", weights, f)
  if mask is not None:
    weights = jnp.where(mask[:, None, None, :], weights, 0.0)  # Padded values are zeroed.
    if q.shape[1] == k.shape[1]:
      weights = jnp.where(mask[:, None, :, None], weights, 0.0)  # Padded query rows.
  return weights


def projection_shape(*, num_heads: int, max_length: int, k: int, share_heads: bool) -> tuple:
  """Shape of E (and F): [max_length, k] shared by heads, else [heads, max_length, k]."""
  return (max_length, k) if share_heads else (num_heads, max_length, k)


@register("linformer")
class LinformerAttention(MultiHeadAttention):
  """Multi-head Linformer attention with learned length projections.

  Variant kwargs:
    max_length: longest input (rows of E, F; default 4096, LRA's longest task).
    k: projected length (default 16, as in LRA).
    share_kv: one projection for keys and values, E = F (default False).
    share_heads: one projection for all heads, E [max_length, k] (default True);
      False gives each head its own, E [heads, max_length, k].

  Parameters: `key_projection` (E) and, unless share_kv, `value_projection` (F),
  Xavier-uniform initialized per head. Cross-layer sharing is not supported.
  """

  supports_causal = False
  why_not_causal = _NOT_CAUSAL

  def __init__(
    self,
    *,
    max_length: int = 4096,
    k: int = 16,
    share_kv: bool = False,
    share_heads: bool = True,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    check_positive_int("linformer", "max_length", max_length)
    check_positive_int("linformer", "k", k)
    check_not_causal("linformer", common.get("causal", False), _NOT_CAUSAL)
    super().__init__(**common)
    rngs, param_dtype, num_heads = common["rngs"], self.param_dtype, self.num_heads
    self.max_length = max_length
    self.k = k
    self.share_kv = share_kv
    self.share_heads = share_heads
    shape = projection_shape(
      num_heads=num_heads, max_length=max_length, k=k, share_heads=share_heads
    )
    # Fans are (max_length, k) per head; the heads axis is a batch of matrices.
    init = nnx.initializers.xavier_uniform(batch_axis=() if share_heads else (0,))
    axes = (None, None) if share_heads else ("heads", None, None)

    def projection():
      return nnx.Param(init(rngs.params(), shape, param_dtype), **param_axes(*axes))

    self.key_projection = projection()
    self.value_projection = None if share_kv else projection()

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return linformer_attention(q, k, v, mask=mask, causal=self.causal, **self.map_params())

  def map_params(self) -> dict:
    f = None if self.value_projection is None else self.value_projection[...]
    return {"key_projection": self.key_projection[...], "value_projection": f}
