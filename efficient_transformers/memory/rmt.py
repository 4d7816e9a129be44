"""Recurrent Memory Transformer, decoder form (Bulatov et al., 2022).

A segment of seg tokens travels with n memory vectors placed twice:

  [read memory (n); segment (seg); write memory (n)]

through a pre-LN decoder stack. The attention pattern (query row -> key column):

  * read keys are visible to every query;
  * segment keys: segment queries see them causally (key <= query), write
    queries see all of them, read queries none (no peeking at the segment);
  * write keys are visible to write queries only (all of them).

So the segment predicts tokens from the memory and its own past, and the write
tokens summarize everything; their final (normalized) outputs are the next
memory. Both memory copies are the same vectors; sinusoidal positions are added
over the whole [read; segment; write] sequence and restart every segment.

Memory pytree: {"tokens": [batch, n, features], "valid": [batch] bool}. A row
with valid False uses the learned initial memory instead, which makes `reset`
and `init_memory` cheap and lets the initial memory be trained. A segment with
no real token leaves its row's memory unchanged.

Gradients flow through the memory: `truncated_bptt` runs a multi-segment
sequence and cuts them every `bptt_segments` segments.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.attention import masking
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import param_axes
from efficient_transformers.layers.embedding import sinusoidal_table
from efficient_transformers.memory.registry import register
from efficient_transformers.memory.transformer_xl import reset_memory


def memory_pattern(num_memory_tokens: int, segment_length: int) -> np.ndarray:
  """The boolean [L, L] keep-pattern (L = 2n + seg) described in the module docstring."""
  n, s = num_memory_tokens, segment_length
  total = 2 * n + s
  keep = np.zeros((total, total), bool)
  keep[:, :n] = True
  keep[n : n + s, n : n + s] = np.tril(np.ones((s, s), bool))
  keep[n + s :, n:] = True
  return keep


@register("rmt")
class RMTMemory(nnx.Module):
  """RMT's memory as an option of the one stack (`Stack(memory="rmt")`).

  The stack runs over [read memory; segment; write memory] with the pattern of
  `memory_pattern` as an additive bias (0 where a pair is kept, a large
  negative number elsewhere), so the stack is built non-causal and its
  attention must take a bias (`supports_bias`: softmax, dot_product).

  Args:
    num_layers, features: the stack's.
    num_memory_tokens: n >= 0 (0 makes it a plain causal decoder).
  """

  causal_stack = False  # The pattern, not the attention's causal flag, orders the tokens.

  def __init__(
    self,
    *,
    num_layers: int,
    features: int,
    num_memory_tokens: int,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    del num_layers
    if not isinstance(num_memory_tokens, int) or num_memory_tokens < 0:
      raise ConfigError(
        f"memory 'rmt': num_memory_tokens={num_memory_tokens!r} must be an integer >= 0.",
        argument="num_memory_tokens",
      )
    self.num_memory_tokens = num_memory_tokens
    self.features = features
    self.dtype = dtype
    self.initial_memory = nnx.Param(
      nnx.initializers.normal(stddev=1.0)(
        rngs.params(), (num_memory_tokens, features), param_dtype
      ),
      **param_axes(None, "embed"),
    )

  @classmethod
  def check_attention(cls, attention_name: str, attention_kwargs: dict, *, causal: bool) -> None:
    """The attention must take an additive bias (the pattern) and not be causal itself."""
    if causal:
      raise ConfigError(
        "memory 'rmt' orders tokens by its own pattern; build its stack with causal=False.",
        argument="causal",
      )
    if attention_kwargs.get("position") is not None:
      raise ConfigError(
        f"memory 'rmt' places sinusoidal positions over [read; segment; write] itself; "
        f"attention position={attention_kwargs['position']!r} does not combine with it.",
        argument="positional",
      )
    takers = [n for n in attention.available() if attention.get_class(n).supports_bias]
    if not attention.get_class(attention_name).supports_bias:
      raise ConfigError(
        f"memory 'rmt' needs an attention that takes an additive bias (its read/write "
        f"pattern); {attention_name!r} does not. Valid: {', '.join(takers)}.",
        argument="attention_name",
      )

  def init_memory(self, batch_size: int) -> dict:
    """{"tokens": zeros [batch, n, features], "valid": False [batch]} (= the learned init)."""
    dtype = self.dtype or jnp.float32
    return {
      "tokens": jnp.zeros((batch_size, self.num_memory_tokens, self.features), dtype),
      "valid": jnp.zeros((batch_size,), bool),
    }

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
    """One segment.

    Args:
      stack: the `models.Stack` that owns this option.
      x: [batch, seg, features] token embeddings without positions (embedding
        dropout, if any, is the caller's).
      memory: from `init_memory` or a previous call.
      mask: [batch, seg] bool, True = real token; None = all real.
      reset: [batch] bool; rows set True restart from the learned memory.

    Returns:
      (y [batch, seg, features] final-normed, new_memory, {}). No stop_gradient here.
    """
    n, (batch, seg, features) = self.num_memory_tokens, x.shape
    if reset is not None:
      memory = reset_memory(memory, reset)
    if mask is None:
      mask = jnp.ones((batch, seg), bool)
    initial = self.initial_memory[...].astype(x.dtype)[None]
    tokens = jnp.where(memory["valid"][:, None, None], memory["tokens"].astype(x.dtype), initial)
    h = jnp.concatenate([tokens, x, tokens], axis=1)
    h = h + jnp.asarray(sinusoidal_table(2 * n + seg, features), x.dtype)[None]
    real = jnp.ones((batch, n), bool)
    key_mask = jnp.concatenate([real, mask, real], axis=1)
    keep = jnp.asarray(memory_pattern(n, seg))[None, None]
    bias = jnp.where(keep, 0.0, masking.large_negative(jnp.float32))
    for block in stack.blocks:
      h = block(h, mask=key_mask, bias=bias, deterministic=deterministic)
    h = stack.final_norm(h)
    has_real = mask.any(axis=1)
    new_memory = {
      "tokens": jnp.where(has_real[:, None, None], h[:, n + seg :], memory["tokens"]),
      "valid": memory["valid"] | has_real,
    }
    return h[:, n : n + seg], new_memory, {}


def truncated_bptt(
  step: Callable[[jax.Array, dict], tuple],
  segments: Sequence[jax.Array],
  memory: dict,
  *,
  bptt_segments: int | None = None,
) -> tuple[list, dict]:
  """Runs `step` over segments, cutting the memory's gradient every `bptt_segments`.

  Args:
    step: (segment, memory) -> (output, new_memory, ...); extra results are kept.
    segments: the segments in order (e.g. [batch, seg] id arrays).
    memory: the memory before the first segment.
    bptt_segments: window length k >= 1: gradients flow through the memory
      within segments [0, k), [k, 2k), ... and stop at each window boundary.
      None = never cut.

  Returns:
    ([step results without the memory, one tuple per segment], final memory).
    The final memory is returned uncut.

  A Python loop: it unrolls under jit, which suits the few segments of an LM
  training window and allows segments of different lengths.
  """
  if bptt_segments is not None and (not isinstance(bptt_segments, int) or bptt_segments < 1):
    raise ConfigError(
      f"bptt_segments={bptt_segments!r} must be an integer >= 1 or None.",
      argument="bptt_segments",
    )
  results = []
  for index, segment in enumerate(segments):
    if bptt_segments is not None and index and index % bptt_segments == 0:
      memory = jax.lax.stop_gradient(memory)
    out = step(segment, memory)
    memory = out[1]
    results.append((out[0], *out[2:]))
  return results, memory
