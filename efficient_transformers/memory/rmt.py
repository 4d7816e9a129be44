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
from efficient_transformers.layers import (
  ACTIVATION_AXES,
  FeedForward,
  constrain,
  layer_norm,
  param_axes,
)
from efficient_transformers.layers.embedding import sinusoidal_table
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


def pattern_attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array) -> jax.Array:
  """softmax(q.k / sqrt(d)) v over allowed pairs, in float32; rows without keys are 0.

  Args:
    q, k, v: [batch, length, heads, head_dim].
    keep: bool, broadcastable to [batch, heads, q_len, kv_len].
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(keep, logits * q.shape[-1] ** -0.5, masking.large_negative(jnp.float32))
  weights = jax.nn.softmax(logits, axis=-1)
  weights = jnp.where(keep.any(-1, keepdims=True), weights, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).astype(q.dtype)


class RMTBlock(nnx.Module):
  """Pre-LN block with a given attention pattern; the parameter layout of EncoderBlock."""

  def __init__(
    self,
    *,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    dropout_rate: float,
    attention_dropout_rate: float,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    self.attention_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    # Only its projections are used: the pattern is not one the attention contract
    # (key padding + causal) can express.
    self.attention = attention.make(
      "softmax",
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

  def __call__(self, x: jax.Array, *, keep: jax.Array, deterministic: bool = True) -> jax.Array:
    """x [batch, length, features]; keep bool broadcastable to [batch, heads, length, length]."""
    att = self.attention
    h = self.attention_norm(x)
    out = pattern_attention(att.query(h), att.key(h), att.value(h), keep)
    h = att.out(att.dropout(out, deterministic=deterministic))
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.mlp_norm(x), deterministic=deterministic)
    return constrain(x + self.dropout(h, deterministic=deterministic), ACTIVATION_AXES)


class RecurrentMemoryTransformer(nnx.Module):
  """Decoder stack over [read memory; segment; write memory].

  Args:
    num_memory_tokens: n >= 0 (0 makes it a plain causal decoder).
    other args: the block sizes, as TransformerXL.
  """

  def __init__(
    self,
    *,
    num_layers: int,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    num_memory_tokens: int,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if not isinstance(num_memory_tokens, int) or num_memory_tokens < 0:
      raise ConfigError(
        f"config.model.num_memory_tokens must be an integer >= 0; got {num_memory_tokens!r}."
      )
    self.num_memory_tokens = num_memory_tokens
    self.features = features
    self.dtype = dtype
    self.blocks = nnx.List(
      [
        RMTBlock(
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
    self.initial_memory = nnx.Param(
      nnx.initializers.normal(stddev=1.0)(
        rngs.params(), (num_memory_tokens, features), param_dtype
      ),
      **param_axes(None, "embed"),
    )

  def init_memory(self, batch_size: int) -> dict:
    """{"tokens": zeros [batch, n, features], "valid": False [batch]} (= the learned init)."""
    dtype = self.dtype or jnp.float32
    return {
      "tokens": jnp.zeros((batch_size, self.num_memory_tokens, self.features), dtype),
      "valid": jnp.zeros((batch_size,), bool),
    }

  def __call__(
    self,
    x: jax.Array,
    memory: dict,
    *,
    mask: jax.Array | None = None,
    reset: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict]:
    """One segment.

    Args:
      x: [batch, seg, features] token embeddings without positions (embedding
        dropout, if any, is the caller's).
      memory: from `init_memory` or a previous call.
      mask: [batch, seg] bool, True = real token; None = all real.
      reset: [batch] bool; rows set True restart from the learned memory.

    Returns:
      (y [batch, seg, features] final-normed, new_memory). No stop_gradient here.
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
    keep = jnp.asarray(memory_pattern(n, seg))[None, None] & key_mask[:, None, None, :]
    for block in self.blocks:
      h = block(h, keep=keep, deterministic=deterministic)
    h = self.final_norm(h)
    has_real = mask.any(axis=1)
    new_memory = {
      "tokens": jnp.where(has_real[:, None, None], h[:, n + seg :], memory["tokens"]),
      "valid": memory["valid"] | has_real,
    }
    return h[:, n : n + seg], new_memory

  def call_with_aux(self, x, memory, *, mask=None, reset=None, deterministic=True):
    """`__call__` plus an empty aux-loss dict (the interface of the XL stacks)."""
    y, new_memory = self(x, memory, mask=mask, reset=reset, deterministic=deterministic)
    return y, new_memory, {}


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
    raise ConfigError(f"config.model.bptt_segments must be >= 1 or None; got {bptt_segments!r}.")
  results = []
  for index, segment in enumerate(segments):
    if bptt_segments is not None and index and index % bptt_segments == 0:
      memory = jax.lax.stop_gradient(memory)
    out = step(segment, memory)
    memory = out[1]
    results.append((out[0], *out[2:]))
  return results, memory
