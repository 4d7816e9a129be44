"""Exact softmax attention in plain XLA: the reference every variant is pinned to.

Vaswani et al., "Attention Is All You Need" (2017). Cost: O(L^2 d) time and
O(L^2) memory per head (it materializes the [q_len, kv_len] logits).
"""

import jax
import jax.numpy as jnp

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention
from efficient_transformers.attention.registry import register
from efficient_transformers.layers import positions


@maps.register_weights("softmax")
def softmax_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  alibi_slopes: jax.Array | None = None,
  q_offset: int = 0,
  bias: jax.Array | None = None,
) -> jax.Array:
  """The softmax probabilities [batch, heads, q_len, kv_len] float32 of `softmax_attention`
  (its arguments); rows of padded queries and rows with no visible key are zeros. For
  inspection at short lengths (`attention.maps`)."""
  maps.check_map_length("softmax", q.shape[1], k.shape[1], max_length)
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if alibi_slopes is not None:
    logits = logits + positions.alibi_bias_for(alibi_slopes, q.shape[1], k.shape[1])[None]
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  keep = masking.logits_bias(
    mask, q_length=q.shape[1], kv_length=k.shape[1], causal=causal, q_offset=q_offset
  )
  if keep is not None:
    logits = jnp.where(keep, logits, masking.large_negative(jnp.float32))
  weights = jax.nn.softmax(logits, axis=-1)
  if keep is not None:
    # A row with no visible key would average all values uniformly; make it 0.
    weights = jnp.where(keep, weights, 0.0)
  if mask is not None and q.shape[1] == k.shape[1]:
    weights = jnp.where(mask[:, None, :, None], weights, 0.0)  # Padded query rows.
  return weights


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  alibi_slopes: jax.Array | None = None,
  q_offset: int = 0,
  bias: jax.Array | None = None,
) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v, computed in float32.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; or None.
    causal: query i sees keys j <= i only.
    alibi_slopes: None, or ALiBi's per-head slopes [heads]: adds
      -slope_h |i - j| to the logits, query i at key position
      i + kv_length - q_length.
    q_offset: the key position of query 0 (a context of that many keys before
      the queries); causal: query i sees keys j <= q_offset + i.
    bias: an additive logit term broadcastable to [batch, heads, q_length,
      kv_length], or None.

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype. Rows of padded queries
    (self-attention) and rows with no visible key are zeros.
  """
  masking.check_qkv("softmax", q, k, v, mask)
  weights = softmax_attention_weights(
    q,
    k,
    mask=mask,
    causal=causal,
    max_length=max(q.shape[1], k.shape[1]),
    alibi_slopes=alibi_slopes,
    q_offset=q_offset,
    bias=bias,
  )
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).astype(q.dtype)


@register("softmax")
class SoftmaxAttention(MultiHeadAttention):
  """Multi-head exact attention with the plain XLA reference kernel.

  Takes every option of the contract: a context (x's queries only), an additive
  bias, and position="rope", "alibi" or "relative" (Transformer-XL).
  """

  supports_alibi = True
  supports_relative = True
  supports_bias = True
  context_queries = True

  def attend(self, q, k, v, *, mask, deterministic, q_offset=0, bias=None):
    del deterministic
    return softmax_attention(
      q,
      k,
      v,
      mask=mask,
      causal=self.causal,
      alibi_slopes=self.alibi_slopes(),
      q_offset=q_offset,
      bias=bias,
    )

  def map_params(self) -> dict:
    return {"alibi_slopes": self.alibi_slopes()}
