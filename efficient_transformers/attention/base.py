"""The module half of the attention contract: projections around a pure function.

Every variant is an `nnx.Module` that subclasses `MultiHeadAttention` and
implements `attend(q, k, v, *, mask, deterministic)` by calling its pure
attention function. Variants with parameters or randomness of their own
(Linformer projections, Performer features, Reformer hashing) add them in
their `__init__`.

Shapes:
  x:       [batch, length, in_features]
  q, k, v: [batch, length, heads, head_dim]
  mask:    [batch, length] bool, True = real token
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.layers.partitioning import param_axes

# Logical axis names of the projection parameters; a rules table in the
# training config maps them onto mesh axes (see training/sharding.py).
QKV_KERNEL_AXES = ("embed", "heads", "kv")
QKV_BIAS_AXES = ("heads", "kv")
OUT_KERNEL_AXES = ("heads", "kv", "embed")
OUT_BIAS_AXES = ("embed",)


class MultiHeadAttention(nnx.Module):
  """Query/key/value/output projections around a pure attention function.

  Dropout (`dropout_rate`) is applied to the per-head attention outputs before
  the output projection, identically for every variant: fused kernels (cuDNN,
  the chunked memory-efficient form, linear attentions) never materialize the
  attention-probability matrix that classic attention dropout would act on.

  Capabilities are class attributes, so a model can check a combination
  before building anything (`registry.available(causal=True)`):
    supports_causal: the variant can run with causal=True (a query sees no
      later key, and no later token changes its output); if not,
      `why_not_causal` says why.
  """

  supports_causal: bool = True
  why_not_causal: str = ""

  def __init__(
    self,
    *,
    in_features: int,
    num_heads: int,
    head_dim: int,
    dropout_rate: float = 0.0,
    causal: bool = False,
    rngs: nnx.Rngs,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
  ):
    self.in_features = in_features
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.causal = causal
    self.dtype = dtype
    self.param_dtype = param_dtype

    def projection():
      return nnx.LinearGeneral(
        in_features,
        (num_heads, head_dim),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_metadata=param_axes(*QKV_KERNEL_AXES),
        bias_metadata=param_axes(*QKV_BIAS_AXES),
        rngs=rngs,
      )

    self.query = projection()
    self.key = projection()
    self.value = projection()
    self.out = nnx.LinearGeneral(
      (num_heads, head_dim),
      in_features,
      axis=(-2, -1),
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=param_axes(*OUT_KERNEL_AXES),
      bias_metadata=param_axes(*OUT_BIAS_AXES),
      rngs=rngs,
    )
    # No stream is taken without dropout, so e.g. a Linen user (nnx.bridge) needs
    # only a "params" RNG.
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

  def attend(
    self,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None,
    deterministic: bool,
  ) -> jax.Array:
    """Runs the variant's pure attention function; returns [batch, q_len, heads, head_dim]."""
    raise NotImplementedError

  def __call__(
    self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    """Self-attention over `x` [batch, length, in_features]; returns the same shape."""
    q, k, v = self.query(x), self.key(x), self.value(x)
    out = self.attend(q, k, v, mask=mask, deterministic=deterministic)
    out = self.dropout(out, deterministic=deterministic)
    return self.out(out)
