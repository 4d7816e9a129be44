"""Exact attention through `jax.nn.dot_product_attention`: cuDNN flash attention on GPU.

On a GPU with cuDNN (compute capability 8.0+, fp16/bf16 inputs, head_dim a
multiple of 8) this is the fused FlashAttention kernel: O(L^2 d) time but
O(L) memory and the fastest exact attention the backend has. Elsewhere it is
JAX's XLA implementation, which, like `softmax_attention`, builds the
[q_len, kv_len] logits.

Padding differs between the two paths:
  * "xla" takes the key-padding mask as a boolean [batch, 1, 1, kv_len] mask,
    so any pattern of padding is exact.
  * "cudnn" takes sequence lengths (`mask.sum(-1)`) and so assumes *right*
    padding (every real token before every pad token), which is what the data
    pipelines of this project produce. An arbitrary mask (holes in the middle)
    is silently treated as a prefix of the same length; use "xla" or the
    "memory_efficient" variant for such masks.
"""

import jax
import jax.numpy as jnp

from efficient_transformers.attention import maps, masking, softmax
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.registry import register
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import positions

IMPLEMENTATIONS = (None, "xla", "cudnn")

_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def check_implementation(implementation: str | None) -> None:
  """Raises ConfigError unless `implementation` is None, "xla" or "cudnn"."""
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(
      f"attention 'dot_product': implementation={implementation!r} is not valid; "
      f"use one of {list(IMPLEMENTATIONS)}.",
      argument="attention_kwargs.implementation",
    )


def _gpu_compute_capability() -> tuple[int, ...] | None:
  """The default GPU's compute capability, or None off CUDA (ROCm, CPU, TPU)."""
  if jax.default_backend() != "gpu":
    return None
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if not capability:
    return None
  try:
    return tuple(int(x) for x in str(capability).split("."))
  except ValueError:
    return None


def resolve_implementation(implementation: str | None, q: jax.Array, k: jax.Array) -> str:
  """Picks "cudnn" or "xla" for `implementation=None`; passes the others through.

  cuDNN flash attention needs CUDA compute capability >= 8.0, fp16/bf16 inputs
  and head_dim a multiple of 8 up to 128 (256 on Hopper and later); outside
  those limits it raises, so auto-selection falls back to XLA instead.
  """
  check_implementation(implementation)
  if implementation == "cudnn" and _gpu_compute_capability() is None:
    raise ConfigError(
      "attention 'dot_product': implementation='cudnn' needs an NVIDIA GPU, and this run's "
      f"backend is {jax.default_backend()}; leave implementation unset (None: cuDNN where "
      "it can run) or set it to 'xla'.",
      argument="attention_kwargs.implementation",
    )
  if implementation is not None:
    return implementation
  capability = _gpu_compute_capability()
  if capability is None or capability < (8, 0):
    return "xla"
  head_dim = q.shape[-1]
  max_head_dim = 256 if capability >= (9, 0) else 128
  if (
    q.dtype in _CUDNN_DTYPES
    and q.dtype == k.dtype
    and head_dim % 8 == 0
    and head_dim <= max_head_dim
  ):
    return "cudnn"
  return "xla"


def _rows_with_a_key(mask: jax.Array | None, q_length: int, causal: bool) -> jax.Array | None:
  """Which query rows see at least one real key: [batch, q_length] bool, or None (all).

  O(L): without causality a row sees a key iff the sequence has any; with it,
  row i sees one iff some key j <= i is real (a running count).
  """
  if mask is None:
    # Every row sees key 0 at least (causal or not).
    return None
  if causal:
    seen = jnp.cumsum(mask.astype(jnp.int32), axis=1) > 0  # [batch, kv_length]
    kv_length = mask.shape[1]
    idx = jnp.minimum(jnp.arange(q_length), kv_length - 1)
    return seen[:, idx]
  return jnp.broadcast_to(mask.any(axis=1, keepdims=True), (mask.shape[0], q_length))


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  implementation: str | None = None,
  alibi_slopes: jax.Array | None = None,
  q_offset: int = 0,
  bias: jax.Array | None = None,
) -> jax.Array:
  """Exact softmax attention through `jax.nn.dot_product_attention`.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; or None. On the "cudnn"
      path it must be right padding (see the module docstring).
    causal: query i sees keys j <= i only.
    implementation: None (auto: "cudnn" where the backend and the inputs allow
      it, else "xla"), "xla" or "cudnn" (raises where cuDNN cannot run).
    alibi_slopes: None, or ALiBi's per-head slopes [heads], passed to the
      kernel as a [1, heads, q_length, kv_length] bias (as in `softmax_attention`;
      on cuDNN this path has not been run on a GPU yet).
    q_offset: the key position of query 0 (a context of that many keys before
      the queries); causal: query i sees keys j <= q_offset + i. Not 0: the
      XLA kernel, with the causal rule as an explicit mask.
    bias: an additive logit term broadcastable to [batch, heads, q_length,
      kv_length], or None.

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype. Rows of padded queries
    (self-attention) and rows with no visible key are zeros.

  Raises:
    ConfigError: `implementation` is not one of None, "xla", "cudnn".
  """
  masking.check_qkv("dot_product", q, k, v, mask)
  impl = resolve_implementation(implementation, q, k)
  q_length, kv_length = q.shape[1], k.shape[1]
  if alibi_slopes is not None:
    alibi = positions.alibi_bias_for(alibi_slopes, q_length, kv_length)[None]
    bias = alibi if bias is None else alibi + bias
  if bias is not None:
    bias = jnp.broadcast_to(jnp.asarray(bias), (*jnp.shape(bias)[:-2], q_length, kv_length)).astype(
      q.dtype
    )
  if q_offset:
    if impl == "cudnn":
      raise ConfigError(
        "attention 'dot_product': implementation='cudnn' takes no context before the queries "
        "(q_offset); use implementation='xla'.",
        argument="attention_kwargs.implementation",
      )
    keep = masking.logits_bias(
      mask, q_length=q_length, kv_length=kv_length, causal=causal, q_offset=q_offset
    )
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=keep, implementation="xla")
    if keep is not None:  # Rows with no visible key are zeros, as below.
      out = jnp.where(keep.any(axis=-1)[:, 0, :, None, None], out, jnp.zeros((), out.dtype))
    return out.astype(q.dtype)

  if mask is None:
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal, implementation=impl)
  elif impl == "xla":
    # [batch, 1, 1, kv_len] broadcasts over heads and queries; the XLA kernel
    # builds the full logits anyway, so an arbitrary mask costs nothing extra.
    out = jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask[:, None, None, :], is_causal=causal, implementation="xla"
    )
  else:
    # cuDNN masks by lengths (right padding). Query lengths only make sense
    # for self-attention, where the key mask is also the query mask.
    kv_lengths = mask.sum(axis=-1, dtype=jnp.int32)
    q_lengths = kv_lengths if q_length == kv_length else None
    out = jax.nn.dot_product_attention(
      q,
      k,
      v,
      bias=bias,
      is_causal=causal,
      query_seq_lengths=q_lengths,
      key_value_seq_lengths=kv_lengths,
      implementation="cudnn",
    )

  # XLA softmaxes a fully masked row uniformly over all keys (finite, but not
  # zero); cuDNN leaves such rows unspecified. `where` (not a multiply) keeps a
  # non-finite value there from leaking into the output.
  has_key = _rows_with_a_key(mask, q_length, causal)
  if has_key is not None:
    out = jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype))
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


@maps.register_weights("dot_product")
def dot_product_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  implementation: str | None = None,
  alibi_slopes: jax.Array | None = None,
  q_offset: int = 0,
  bias: jax.Array | None = None,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `dot_product_attention` (its arguments).

  Exact attention: the softmax probabilities (`softmax.softmax_attention_weights`),
  whichever kernel computes the output; `implementation` is checked, not used. On
  "cudnn" the kernel reads the mask as right padding, and so equals this map for such
  masks (see the module docstring). Quadratic by nature; for inspection at short
  lengths (`attention.maps`).
  """
  maps.check_map_length("dot_product", q.shape[1], k.shape[1], max_length)
  check_implementation(implementation)
  return softmax.softmax_attention_weights(
    q,
    k,
    mask=mask,
    causal=causal,
    max_length=max_length,
    alibi_slopes=alibi_slopes,
    q_offset=q_offset,
    bias=bias,
  )


_DEFAULTS = defaults_of(dot_product_attention)


@register("dot_product")
class DotProductAttention(MultiHeadAttention):
  """Multi-head exact attention through `jax.nn.dot_product_attention` (cuDNN on GPU).

  Variant kwargs:
    implementation: None (auto), "xla" or "cudnn".
  """

  def __init__(
    self,
    *,
    implementation: str | None = _DEFAULTS.implementation,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    check_implementation(implementation)
    super().__init__(**common)
    self.implementation = implementation

  supports_alibi = True

  supports_bias = True
  context_queries = True

  def attend(self, q, k, v, *, mask, deterministic, q_offset=0, bias=None):
    del deterministic
    return dot_product_attention(
      q, k, v, mask=mask, causal=self.causal, q_offset=q_offset, bias=bias, **self.map_params()
    )

  def map_params(self) -> dict:
    return {"implementation": self.implementation, "alibi_slopes": self.alibi_slopes()}
