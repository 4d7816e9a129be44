"""Transformer-XL (Dai et al., 2019): segment recurrence with relative positions.

Each layer attends over [memory; segment], where the memory holds that layer's
inputs from the previous segments. The memory is an explicit pytree

  {"hidden": [num_layers, batch, mem_len, features], "valid": [batch, mem_len] bool}

right-aligned (the newest entry last); `valid` False marks an empty slot, which
every query masks out. Positions are relative, so a memory of any length works
at evaluation, e.g. longer than the `mem_len` used in training.

Gradients stop at the memory boundary (DESIGN.md, the recurrent-memory
contract): the incoming memory and the returned one are both wrapped in
`jax.lax.stop_gradient`, unless `stop_memory_gradient=False`.

The u and v biases are per layer (the paper shares them across layers; per layer
is a strict superset and keeps every block self-contained).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.attention.base import (
  OUT_BIAS_AXES,
  OUT_KERNEL_AXES,
  QKV_BIAS_AXES,
  QKV_KERNEL_AXES,
)
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import (
  ACTIVATION_AXES,
  FeedForward,
  constrain,
  layer_norm,
  param_axes,
)
from efficient_transformers.memory.relative import relative_attention, sinusoidal_relative_encoding

# Memory entries whose batch axis is 1 ([layers, batch, ...]); every other entry has it at 0.
_LAYERED_ENTRIES = ("hidden", "compressed")


def reset_memory(memory: dict, reset: jax.Array) -> dict:
  """Empties the memory rows that start a new document or stream.

  Args:
    memory: a memory pytree of this package (Transformer-XL, compressive or RMT).
    reset: [batch] bool, True = forget this row.

  Returns:
    The same structure with float entries zeroed and bool (validity) entries
    False in the reset rows; other rows untouched.
  """
  out = {}
  for name, value in memory.items():
    axis = 1 if name in _LAYERED_ENTRIES else 0
    shape = [1] * value.ndim
    shape[axis] = value.shape[axis]
    keep = jnp.logical_not(reset).reshape(shape)
    out[name] = jnp.where(keep, value, jnp.zeros((), value.dtype))
  return out


class RelativeMultiHeadAttention(nnx.Module):
  """Multi-head attention of a segment over [context; segment] with relative positions.

  Shapes: x [batch, qlen, features], context [batch, clen, features] (memory,
  already normalized like x); mask [batch, clen + qlen] bool; out like x.
  """

  def __init__(
    self,
    *,
    in_features: int,
    num_heads: int,
    head_dim: int,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
  ):
    self.in_features = in_features

    def projection(use_bias: bool = True):
      return nnx.LinearGeneral(
        in_features,
        (num_heads, head_dim),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_metadata=param_axes(*QKV_KERNEL_AXES),
        bias_metadata=param_axes(*QKV_BIAS_AXES),
        rngs=rngs,
      )

    self.query = projection()
    self.key = projection()
    self.value = projection()
    # W_r of the paper: projects the sinusoids of the distances, no bias.
    self.position = projection(use_bias=False)
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
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

  def __call__(
    self,
    x: jax.Array,
    context: jax.Array,
    *,
    mask: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    h = jnp.concatenate([context.astype(x.dtype), x], axis=1)
    q, k, v = self.query(x), self.key(h), self.value(h)
    encoding = sinusoidal_relative_encoding(h.shape[1], self.in_features, dtype=x.dtype)
    r = self.position(encoding)
    out = relative_attention(q, k, v, r, self.u_bias[...], self.v_bias[...], mask=mask)
    out = self.dropout(out, deterministic=deterministic)
    return self.out(out)


class XLBlock(nnx.Module):
  """Pre-LN block: x + RelAttn(LN(x) over LN([context; x])), then x + MLP(LN(x))."""

  def __init__(
    self,
    *,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    self.attention_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention = RelativeMultiHeadAttention(
      in_features=features,
      num_heads=num_heads,
      head_dim=head_dim,
      dropout_rate=attention_dropout_rate,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.mlp_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp = FeedForward(
      features, mlp_dim, dropout_rate=dropout_rate, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,
    context: jax.Array,
    *,
    mask: jax.Array | None,
    deterministic: bool = True,
  ) -> jax.Array:
    """x [batch, qlen, features], context [batch, clen, features] (raw layer inputs)."""
    h = self.attention(
      self.attention_norm(x),
      self.attention_norm(context.astype(x.dtype)),
      mask=mask,
      deterministic=deterministic,
    )
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.mlp_norm(x), deterministic=deterministic)
    return constrain(x + self.dropout(h, deterministic=deterministic), ACTIVATION_AXES)


def push(old: jax.Array, new: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Appends `new` [batch, n, ...] to the FIFO `old` [batch, m, ...] along axis 1.

  Returns:
    (kept [batch, m, ...] = the last m of [old; new], evicted [batch, n, ...] = the first n).
  """
  both = jnp.concatenate([old.astype(new.dtype), new], axis=1)
  n = new.shape[1]
  return both[:, n:], both[:, :n]


def check_mem_len(name: str, value: int) -> None:
  """Raises ConfigError naming config.model.`name` unless `value` is an int >= 0."""
  if not isinstance(value, int) or value < 0:
    raise ConfigError(f"config.model.{name} must be an integer >= 0; got {value!r}.")


class TransformerXL(nnx.Module):
  """A stack of XLBlocks with a per-layer memory of past layer inputs.

  Args:
    num_layers, features, num_heads, head_dim, mlp_dim: the block sizes.
    mem_len: memory slots per layer made by `init_memory` (the training length).
    stop_memory_gradient: stop gradients at the memory boundary (the contract).
  """

  def __init__(
    self,
    *,
    num_layers: int,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    mem_len: int,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    stop_memory_gradient: bool = True,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    check_mem_len("mem_len", mem_len)
    if num_layers < 1:
      raise ConfigError(f"config.model.num_layers must be >= 1; got {num_layers}.")
    self.num_layers = num_layers
    self.features = features
    self.mem_len = mem_len
    self.stop_memory_gradient = stop_memory_gradient
    self.dtype = dtype
    self.blocks = nnx.List(
      [
        XLBlock(
          features=features,
          num_heads=num_heads,
          head_dim=head_dim,
          mlp_dim=mlp_dim,
          dropout_rate=dropout_rate,
          attention_dropout_rate=attention_dropout_rate,
          rngs=rngs,
          dtype=dtype,
          param_dtype=param_dtype,
        )
        for _ in range(num_layers)
      ]
    )
    self.final_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def init_memory(self, batch_size: int, *, mem_len: int | None = None) -> dict:
    """An empty memory; `mem_len` overrides the configured length (e.g. longer at eval).

    Returns:
      {"hidden": zeros [num_layers, batch, mem_len, features],
       "valid": False [batch, mem_len]}.
    """
    mem_len = self.mem_len if mem_len is None else mem_len
    check_mem_len("mem_len", mem_len)
    dtype = self.dtype or jnp.float32
    return {
      "hidden": jnp.zeros((self.num_layers, batch_size, mem_len, self.features), dtype),
      "valid": jnp.zeros((batch_size, mem_len), bool),
    }

  def _prepare(self, x, memory, mask, reset) -> tuple[dict, jax.Array]:
    """Applies reset and the input stop-gradient; returns (memory, segment mask)."""
    hidden = memory["hidden"]
    if hidden.shape[0] != self.num_layers or hidden.shape[1] != x.shape[0]:
      raise ValueError(
        f"memory['hidden'] must be [{self.num_layers}, {x.shape[0]}, mem_len, features]; "
        f"got {hidden.shape}."
      )
    if reset is not None:
      memory = reset_memory(memory, reset)
    if self.stop_memory_gradient:
      memory = jax.lax.stop_gradient(memory)
    if mask is None:
      mask = jnp.ones(x.shape[:2], bool)
    return memory, mask

  def _stack(self, x, contexts, kv_mask, deterministic):
    """Runs the blocks; returns (final-normed y, [layer inputs])."""
    inputs = []
    for block, context in zip(self.blocks, contexts, strict=True):
      inputs.append(x)
      x = block(x, context, mask=kv_mask, deterministic=deterministic)
    return self.final_norm(x), inputs

  def _finish(self, new_memory: dict) -> dict:
    return jax.lax.stop_gradient(new_memory) if self.stop_memory_gradient else new_memory

  def call_with_aux(
    self,
    x: jax.Array,
    memory: dict,
    *,
    mask: jax.Array | None = None,
    reset: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict, dict]:
    """Like `__call__`, plus an aux-loss dict (empty here; see the compressive variant)."""
    memory, mask = self._prepare(x, memory, mask, reset)
    kv_mask = jnp.concatenate([memory["valid"], mask], axis=1)
    y, inputs = self._stack(x, list(memory["hidden"]), kv_mask, deterministic)
    hidden = [push(old, new)[0] for old, new in zip(memory["hidden"], inputs, strict=True)]
    new_memory = {"hidden": jnp.stack(hidden), "valid": push(memory["valid"], mask)[0]}
    return y, self._finish(new_memory), {}

  def __call__(
    self,
    x: jax.Array,
    memory: dict,
    *,
    mask: jax.Array | None = None,
    reset: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict]:
    """One segment through the stack, reading and updating the memory.

    Args:
      x: [batch, seg, features], the embedded segment (no positions added:
        positions are relative, inside attention). Any seg >= 1 works, so a
        sequence may be fed a segment or a token at a time.
      memory: from `init_memory` or a previous call; its length is kept.
      mask: [batch, seg] bool, True = real token; padded tokens are never
        attended to, now or from the memory. None = all real.
      reset: [batch] bool; rows set True forget their memory first.
      deterministic: disables dropout.

    Returns:
      (y [batch, seg, features] final-normed, new_memory of the same structure).
    """
    y, new_memory, _ = self.call_with_aux(
      x, memory, mask=mask, reset=reset, deterministic=deterministic
    )
    return y, new_memory
