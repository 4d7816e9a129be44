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
is a strict superset and keeps every block self-contained). They, W_r and the
relative attention belong to the softmax attention with position="relative"
(`attention.relative`); this module holds the memory only.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.memory.registry import register

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


def push(old: jax.Array, new: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Appends `new` [batch, n, ...] to the FIFO `old` [batch, m, ...] along axis 1.

  Returns:
    (kept [batch, m, ...] = the last m of [old; new], evicted [batch, n, ...] = the first n).
  """
  both = jnp.concatenate([old.astype(new.dtype), new], axis=1)
  n = new.shape[1]
  return both[:, n:], both[:, :n]


def check_mem_len(name: str, value: int) -> None:
  """Raises ConfigError naming the argument `name` unless `value` is an int >= 0."""
  if not isinstance(value, int) or value < 0:
    raise ConfigError(
      f"{name}={value!r} (memory slots per layer) must be an integer >= 0.", argument=name
    )


@register("transformer_xl")
class TransformerXLMemory(nnx.Module):
  """Transformer-XL's memory as an option of the one stack (`Stack(memory="transformer_xl")`).

  Each block reads its own memory slot as the context of its attention, keys and
  values over [memory; segment]. With softmax and position="relative" (the
  default of every model that builds it) this is the paper's model; any other
  attention takes the memory too (`attention.base`: every variant takes a
  context), with RoPE or ALiBi positions, which are relative as well, or none.

  Args:
    num_layers, features: the stack's.
    mem_len: memory slots per layer made by `init_memory` (the training length).
    stop_memory_gradient: stop gradients at the memory boundary (the contract).
  """

  causal_stack = True  # The stack's attention must be causal.

  def __init__(
    self,
    *,
    num_layers: int,
    features: int,
    mem_len: int,
    stop_memory_gradient: bool = True,
    rngs: nnx.Rngs | None = None,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    del rngs, param_dtype
    check_mem_len("mem_len", mem_len)
    if num_layers < 1:
      raise ConfigError(
        f"memory {type(self).registered_name!r}: num_layers={num_layers} must be >= 1.",
        argument="num_layers",
      )
    self.num_layers = num_layers
    self.features = features
    self.mem_len = mem_len
    self.stop_memory_gradient = stop_memory_gradient
    self.dtype = dtype

  @classmethod
  def check_attention(cls, attention_name: str, attention_kwargs: dict, *, causal: bool) -> None:
    """Every attention takes a context; the stack must be causal."""
    del attention_name, attention_kwargs
    if not causal:
      raise ConfigError(
        f"memory {cls.registered_name!r} runs a causal stack (a segment reads its past); "
        "set causal=True.",
        argument="causal",
      )

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

  def prepare(self, x, memory, mask, reset) -> tuple[dict, jax.Array]:
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

  def run_blocks(self, stack, x, contexts, context_mask, mask, deterministic):
    """The stack's blocks, block i reading contexts[i]; returns (final-normed y, [inputs])."""
    inputs = []
    for block, context in zip(stack.blocks, contexts, strict=True):
      inputs.append(x)
      x = block(
        x, mask=mask, context=context, context_mask=context_mask, deterministic=deterministic
      )
    return stack.final_norm(x), inputs

  def finish(self, new_memory: dict) -> dict:
    return jax.lax.stop_gradient(new_memory) if self.stop_memory_gradient else new_memory

  def run(
    self,
    stack,
    x: jax.Array,
    memory: dict,
    *,
    mask: jax.Array | None = None,
    reset: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict, dict]:
    """One segment through `stack`, reading and updating the memory.

    Args:
      stack: the `models.Stack` that owns this option (its blocks and final norm).
      x: [batch, seg, features], the embedded segment. Any seg >= 1 works, so a
        sequence may be fed a segment or a token at a time.
      memory: from `init_memory` or a previous call; its length is kept.
      mask: [batch, seg] bool, True = real token; padded tokens are never
        attended to, now or from the memory. None = all real.
      reset: [batch] bool; rows set True forget their memory first.
      deterministic: disables dropout.

    Returns:
      (y [batch, seg, features] final-normed, new_memory of the same structure, {}).
    """
    memory, mask = self.prepare(x, memory, mask, reset)
    y, inputs = self.run_blocks(
      stack, x, list(memory["hidden"]), memory["valid"], mask, deterministic
    )
    hidden = [push(old, new)[0] for old, new in zip(memory["hidden"], inputs, strict=True)]
    new_memory = {"hidden": jnp.stack(hidden), "valid": push(memory["valid"], mask)[0]}
    return y, self.finish(new_memory), {}
