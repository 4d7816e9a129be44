"""The mixer contract: what a non-attention sequence mixer takes, declares and refuses.

  module(x, *, mask=None, context=None, context_mask=None, bias=None, deterministic=True)

x is [batch, length, in_features], mask [batch, length] bool (True = real
token); the output has x's shape. Padded positions never influence real ones:
a recurrent mixer does not update its state at padding, a convolution sees
zeros there. Mixers take no memory context, no additive bias and no position
scheme (they are position-aware by construction); asking for one is a
ConfigError naming the mixer and the option.

Class attributes declare what a mixer supports, as attention variants do:
  supports_causal: causal=True works (no output depends on a later input).
  supports_step: `init_state(batch_size)` and `step(x_t, state) -> (y_t, state)`
    decode one token at a time with O(1) state, equal to the full forward pass
    (causal mixers only).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError


class SequenceMixer(nnx.Module):
  """Base of the non-attention mixers; subclasses implement `mix`.

  Args (the common ones of `attention.make`, so a block builds either):
    in_features: the model width (features of x).
    num_heads, head_dim: the attention's head layout; mixers that have no
      heads use num_heads * head_dim as their inner width where they need one.
    dropout_rate: dropout on the mixer's output.
    causal: no output depends on a later input.
    position: must be None: a mixer takes no position scheme.
    rngs, dtype, param_dtype: as for every NNX layer.
  """

  registered_name = "?"
  supports_causal: bool = True
  supports_step: bool = False
  # Never: they exist on the attention side of the contract only.
  supports_rope = supports_alibi = supports_relative = supports_bias = False
  context_queries = False

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
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if position not in (None, "none"):
      raise ConfigError(
        f"mixer {self.registered_name!r} takes no position scheme (position={position!r}); "
        "it is position-aware by construction: use positional='none' or 'sinusoidal'.",
        argument="positional",
      )
    self.in_features = in_features
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.causal = causal
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

  def check_positive_int(self, name: str, value) -> None:
    """A ConfigError naming the mixer and kwarg `name` unless `value` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(
        f"mixer {self.registered_name!r}: {name}={value!r} must be a positive integer.",
        argument=f"attention_kwargs.{name}",
      )

  def resolve_bidirectional(self, bidirectional: bool | None) -> bool:
    """None -> not causal; bidirectional=True with causal=True is a ConfigError (the backward
    pass reads later inputs)."""
    if bidirectional is None:
      return not self.causal
    if self.causal and bidirectional:
      raise ConfigError(
        f"mixer {self.registered_name!r} cannot be causal and bidirectional (causal=True "
        "with bidirectional=True): the backward pass reads later inputs. Leave bidirectional "
        "unset (it defaults to not causal) or set it False.",
        argument="attention_kwargs.bidirectional",
      )
    return bool(bidirectional)

  def mix(self, x: jax.Array, *, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """[batch, length, in_features] -> the same shape; padding (mask False) influences nothing."""
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
    del context_mask
    if context is not None:
      raise ConfigError(
        f"mixer {self.registered_name!r} takes no memory context (memory=transformer_xl, "
        "compressive or rmt need an attention); use memory='none'.",
        argument="memory",
      )
    if bias is not None:
      raise ConfigError(
        f"mixer {self.registered_name!r} takes no additive bias (position='alibi' or "
        "'relative', or an RMT memory pattern).",
        argument="positional",
      )
    y = self.mix(x, mask=mask, deterministic=deterministic)
    return self.dropout(y, deterministic=deterministic)
