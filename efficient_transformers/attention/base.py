"""The module half of the attention contract: projections around a pure function.

Every variant is an `nnx.Module` that subclasses `MultiHeadAttention` and
implements `attend(q, k, v, *, mask, deterministic)` by calling its pure
attention function. Variants with parameters or randomness of their own
(Linformer projections, Performer features, Reformer hashing) add them in
their `__init__`.

The module's call (flaxformer's DenseAttention contract, narrowed to self-
attention plus a context):

  module(x, *, mask, context=None, context_mask=None, bias=None, deterministic)

Queries come from x; keys and values from [context; x] when a memory supplies a
context (Transformer-XL's cached layer inputs, RMT's memory tokens), else from
x. `bias` is an additive logit term. What a variant takes is declared on its
class (see `MultiHeadAttention`), and anything else is a ConfigError naming
the variant and the option.

Shapes:
  x:       [batch, length, in_features]
  context: [batch, context_length, in_features]
  q, k, v: [batch, length, heads, head_dim]
  mask:    [batch, length] bool, True = real token (context_mask likewise)
  bias:    broadcastable to [batch, heads, length, context_length + length]
"""

import inspect
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.attention import maps, relative
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import positions
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
    supports_rope: `position="rope"` works (the kernel takes q and k, which
      the module rotates before calling it).
    supports_alibi: `position="alibi"` works (the kernel takes ALiBi's
      additive bias, computed blockwise where the kernel is blockwise).
    supports_relative: `position="relative"` works (Transformer-XL's relative
      positions with u and v biases, `attention.relative`; causal only).
    supports_bias: the call takes `bias`, an additive logit term.
    supports_step: `init_state(batch_size)` and `step(x_t, state) -> (y_t, state)`
      decode one token at a time with O(1) state, equal to the causal full pass
      (the kernelized attentions' RNN form, `linear.KernelizedAttention`).
    context_queries: with a context, the kernel takes x's queries against the
      [context; x] keys directly (query i at key position context_length + i).
      Every other variant takes a context too: it runs its own self-attention
      over [context; x] and keeps x's rows, which is the same function of x
      under the variant's pattern over the concatenation (local attention's
      window reaches back into the context, causal variants see the whole
      context); the context's own rows are computed and dropped.

  Positions (`position`): None, "rope" (RoPE rotates q and k, `positions.rotate`;
  with a context, x's queries sit after it), "alibi" (the kernel adds
  -slope_h |i - j| to the logits; the slopes are
  `positions.alibi_slopes(num_heads)`) or "relative" (Transformer-XL).
  """

  supports_causal: bool = True
  why_not_causal: str = ""
  supports_rope: bool = True
  supports_alibi: bool = False
  supports_relative: bool = False
  supports_bias: bool = False
  supports_step: bool = False
  context_queries: bool = False

  def __init__(
    self,
    *,
    in_features: int,
    num_heads: int,
    head_dim: int,
    dropout_rate: float = 0.0,
    causal: bool = False,
    position: str | None = None,
    rngs: nnx.Rngs,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
  ):
    check_position(type(self), position)
    self.position_kind = position
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
    if position == "relative":
      if not causal:
        raise ConfigError(
          "position='relative' (Transformer-XL) is causal only; set causal=True or "
          "another position.",
          argument="positional",
        )
      # Transformer-XL's W_r (projects the sinusoids of the distances, no bias)
      # and its u and v biases, in the order and under the names of the original
      # TransformerXL module, so its checkpoints and initial values carry over.
      self.position = nnx.LinearGeneral(
        in_features,
        (num_heads, head_dim),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_metadata=param_axes(*QKV_KERNEL_AXES),
        rngs=rngs,
      )
      zeros = nnx.initializers.zeros_init()
      self.u_bias = nnx.Param(
        zeros(rngs.params(), (num_heads, head_dim), param_dtype), **param_axes(*QKV_BIAS_AXES)
      )
      self.v_bias = nnx.Param(
        zeros(rngs.params(), (num_heads, head_dim), param_dtype), **param_axes(*QKV_BIAS_AXES)
      )
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

  def alibi_slopes(self) -> jax.Array | None:
    """ALiBi's per-head slopes [num_heads] with position="alibi", else None."""
    if self.position_kind != "alibi":
      return None
    return jnp.asarray(positions.alibi_slopes(self.num_heads))

  def rotate(self, x: jax.Array, offset: int = 0) -> jax.Array:
    """x [batch, length, heads, head_dim] rotated by RoPE with position="rope", else x."""
    return positions.rotate(x, offset=offset) if self.position_kind == "rope" else x

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
    self,
    x: jax.Array,
    *,
    mask: jax.Array | None = None,
    context: jax.Array | None = None,
    context_mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    """Attention of `x` [batch, length, in_features] over [context; x]; returns x's shape.

    Args:
      x: the queries' inputs (and the last keys and values).
      mask: [batch, length] bool, True = real token; None = all real.
      context: [batch, context_length, in_features] inputs of keys and values
        before x's own (a memory), or None for self-attention.
      context_mask: [batch, context_length] bool (empty memory slots False);
        None = all real.
      bias: an additive logit term broadcastable to [batch, heads, length,
        context_length + length] (variants with `supports_bias`).
      deterministic: disables dropout.
    """
    plain = context is None and bias is None and self.position_kind != "relative"
    maps.record(self, x, mask, self_attention=plain)  # Only inside maps.capture().
    if plain:
      return self._self_attention(x, mask=mask, deterministic=deterministic)
    name = getattr(type(self), "registered_name", type(self).__name__)
    if bias is not None and not self.supports_bias:
      from efficient_transformers.attention import registry  # Below this module otherwise.

      takers = [n for n in registry.available() if registry.get_class(n).supports_bias]
      raise ConfigError(
        f"attention {name!r} does not take an additive bias; variants that do: "
        f"{', '.join(takers)}.",
        argument="attention_name",
      )
    if bias is not None and self.position_kind == "relative":
      raise ConfigError(
        f"attention {name!r}: position='relative' takes no additive bias.", argument="positional"
      )
    length = x.shape[1]
    context_length = 0 if context is None else context.shape[1]
    h = x if context is None else jnp.concatenate([context.astype(x.dtype), x], axis=1)
    kv_mask = join_masks(context_mask, mask, x.shape[0], context_length, length)
    if self.position_kind == "relative":
      q, k, v = self.query(x), self.key(h), self.value(h)
      encoding = relative.sinusoidal_relative_encoding(h.shape[1], self.in_features, dtype=x.dtype)
      out = relative.relative_attention(
        q, k, v, self.position(encoding), self.u_bias[...], self.v_bias[...], mask=kv_mask
      )
    elif self.context_queries:
      q = self.rotate(self.query(x), offset=context_length)
      k, v = self.rotate(self.key(h)), self.value(h)
      extra = {} if bias is None else {"bias": bias}
      out = self.attend(
        q, k, v, mask=kv_mask, deterministic=deterministic, q_offset=context_length, **extra
      )
    else:
      # The variant's own self-attention over [context; x], x's rows kept (the
      # output projection acts per row, so slicing after it is the same).
      y = self._self_attention(h, mask=kv_mask, deterministic=deterministic)
      return y[:, context_length:]
    if mask is not None and context is not None:
      out = jnp.where(mask[:, :, None, None], out, jnp.zeros((), out.dtype))
    out = self.dropout(out, deterministic=deterministic)
    return self.out(out)

  def attention_weights(
    self, x: jax.Array, *, mask: jax.Array | None = None, max_length: int = maps.MAX_MAP_LENGTH
  ) -> jax.Array:
    """The map [batch, heads, L, L] of self-attention over x [batch, L, in_features].

    With v = self.value(x), `self.out(maps.apply_weights(map, v))` is `self(x, mask=mask)`
    (deterministic), up to float error. Quadratic by nature: for inspection at short
    lengths, a ConfigError above `max_length` (see `attention.maps`).
    """
    name = getattr(type(self), "registered_name", type(self).__name__)
    maps.check_map_length(name, x.shape[1], x.shape[1], max_length)
    q, k = self.rotate(self.query(x)), self.rotate(self.key(x))
    return maps.attention_weights(
      name, q, k, mask=mask, causal=self.causal, max_length=max_length, **self.map_params()
    )

  def map_params(self) -> dict:
    """The kwargs and parameters of this variant's map function (`maps.attention_weights`)
    beyond q, k, mask and causal: its block sizes, random features, projections, ...
    Variants whose attention function takes the same ones pass them from here in `attend`,
    so the map and the output read one list."""
    return {}

  def _self_attention(self, x, *, mask, deterministic):
    """Self-attention over x [batch, length, in_features] (variants may override it)."""
    q, k, v = self.rotate(self.query(x)), self.rotate(self.key(x)), self.value(x)
    out = self.attend(q, k, v, mask=mask, deterministic=deterministic)
    out = self.dropout(out, deterministic=deterministic)
    return self.out(out)


def join_masks(context_mask, mask, batch: int, context_length: int, length: int):
  """The key mask [batch, context_length + length] of [context; x], or None if all real."""
  if context_mask is None and mask is None:
    return None
  if context_mask is None:
    context_mask = jnp.ones((batch, context_length), bool)
  if mask is None:
    mask = jnp.ones((batch, length), bool)
  return jnp.concatenate([context_mask.astype(bool), mask.astype(bool)], axis=1)


def defaults_of(*functions: Callable) -> types.SimpleNamespace:
  """The keyword defaults of `functions` (a variant's pure functions), by name.

  A variant's module takes the defaults of the kwargs it shares with its pure
  function from here, so the function's signature is the one place each
  default is declared (and `registry.variant_kwargs` still reads them):

      _DEFAULTS = defaults_of(local_attention)

      def __init__(self, *, block_size: int = _DEFAULTS.block_size, **common): ...

  With several functions, the first one declaring a name gives its default.
  """
  defaults = {}
  for function in functions:
    for name, parameter in inspect.signature(function).parameters.items():
      if parameter.default is not parameter.empty:
        defaults.setdefault(name, parameter.default)
  return types.SimpleNamespace(**defaults)


POSITIONS = (None, "rope", "alibi", "relative")


def check_position(cls: type, position) -> None:
  """Raises ConfigError for a position the variant `cls` does not take, naming both."""
  name = getattr(cls, "registered_name", cls.__name__)
  if position not in POSITIONS:
    raise ConfigError(
      f"attention {name!r}: position must be None, 'rope', 'alibi' or 'relative'; "
      f"got {position!r}.",
      argument="positional",
    )
  if position == "rope" and not cls.supports_rope:
    raise ConfigError(
      f"attention {name!r} does not take position='rope' (its kernel does not compare "
      "queries with keys).",
      argument="positional",
    )
  if position == "alibi" and not cls.supports_alibi:
    from efficient_transformers.attention import registry  # Below this module otherwise.

    takers = [n for n in registry.available() if registry.get_class(n).supports_alibi]
    raise ConfigError(
      f"attention {name!r} does not take position='alibi' (its kernel takes no additive "
      f"bias); variants that do: {', '.join(takers)}.",
      argument="positional",
    )
  if position == "relative" and not cls.supports_relative:
    raise ConfigError(
      f"attention {name!r} does not take position='relative' (Transformer-XL's relative "
      "positions need the full logits); variants that do: softmax.",
      argument="positional",
    )
