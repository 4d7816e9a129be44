"""A byte-level decoder language model with a choice of recurrent memory.

`memory` selects the stack between the token embedding and the output head:

  "none"            a plain pre-LN causal decoder (the shared `Stack`) with any
                    attention that can be causal (`attention.available(
                    causal=True)`); absolute sinusoidal positions from
                    TokenEmbedding, restarting every segment; no memory ({}).
  "transformer_xl"  TransformerXL: relative positions, memory of mem_len slots.
  "compressive"     CompressiveTransformer: plus cmem_len compressed slots.
  "rmt"             RecurrentMemoryTransformer: num_memory_tokens memory vectors.

The output head is a separate (untied) Linear [emb_dim, vocab]: the token
embedding is initialized with unit variance, which would make tied logits
start with a spread of about sqrt(emb_dim).

Token ids: byte + 1 in 1..256, 0 = padding (never attended to, never stored as
valid memory); vocab_size 257.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import TokenEmbedding, param_axes, positions
from efficient_transformers.memory import (
  CompressiveTransformer,
  RecurrentMemoryTransformer,
  TransformerXL,
  reset_memory,
  truncated_bptt,
)
from efficient_transformers.models.stack import Stack

MEMORY_KINDS = ("none", "transformer_xl", "compressive", "rmt")
# Each memory kind's own position scheme (the default of `positional`).
POSITIONAL = {
  "none": "sinusoidal",
  "transformer_xl": "relative",
  "compressive": "relative",
  "rmt": "sinusoidal",
}


class CausalDecoder(Stack):
  """The memory="none" stack: a causal `Stack` with the memory interface; memory is {}."""

  def __init__(self, **kwargs):
    super().__init__(causal=True, **kwargs)

  def init_memory(self, batch_size: int) -> dict:
    del batch_size
    return {}

  def call_with_aux(self, x, memory, *, mask=None, reset=None, deterministic=True):
    """x [batch, seg, features] -> (y [batch, seg, features], {}, {})."""
    del memory, reset
    return self(x, mask=mask, deterministic=deterministic), {}, {}


class DecoderLM(nnx.Module):
  """Token ids [batch, seg] -> next-token logits [batch, seg, vocab], segment by segment.

  Args:
    vocab_size: 257 for bytes (id 0 = padding).
    num_layers, emb_dim, num_heads, qkv_dim, mlp_dim: the stack's sizes
      (head_dim = qkv_dim / num_heads).
    segment_length: the longest segment a call accepts (the training length).
    dropout_rate: residual, MLP and embedding dropout.
    attention_dropout_rate: dropout on per-head attention outputs.
    memory: one of MEMORY_KINDS.
    attention_name, attention_kwargs: the causal attention of memory="none",
      as `attention.make` takes them. The memory stacks have attention of
      their own (softmax over [memory; segment]) and take only "softmax".
    positional: the position scheme; "" = the memory kind's own (POSITIONAL).
      memory="none" takes any of `layers.positions.POSITIONALS` (sinusoidal,
      learned, axial, rope, alibi, none; positions restart every segment);
      the memory stacks take their own only, for now.
    mem_len: Transformer-XL / compressive memory slots per layer.
    cmem_len, compression, compression_rate: the compressive memory.
    num_memory_tokens: RMT memory vectors.
  """

  input_names = ("inputs",)

  def __init__(
    self,
    *,
    vocab_size: int = 257,
    num_layers: int,
    emb_dim: int,
    num_heads: int,
    qkv_dim: int,
    mlp_dim: int,
    segment_length: int,
    dropout_rate: float = 0.1,
    attention_dropout_rate: float = 0.0,
    memory: str = "none",
    attention_name: str = "softmax",
    attention_kwargs: dict | None = None,
    positional: str = "",
    mem_len: int = 0,
    cmem_len: int = 0,
    compression: str = "conv",
    compression_rate: int = 1,
    num_memory_tokens: int = 0,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if memory not in MEMORY_KINDS:
      raise ConfigError(f"config.model.memory must be one of {MEMORY_KINDS}; got {memory!r}.")
    if qkv_dim % num_heads:
      raise ConfigError(
        f"config.model.qkv_dim={qkv_dim} must be divisible by model.num_heads={num_heads}."
      )
    if not isinstance(segment_length, int) or segment_length < 1:
      raise ConfigError(f"config.model.segment_length must be >= 1; got {segment_length!r}.")
    if memory == "compressive" and compression_rate >= 1 and segment_length % compression_rate:
      raise ConfigError(
        f"config.model.segment_length={segment_length} must be a multiple of "
        f"config.model.compression_rate={compression_rate}."
      )
    if memory != "none" and attention_name != "softmax":
      raise ConfigError(
        f"memory={memory!r} takes attention 'softmax' only (its attention runs over "
        f"[memory; segment]); got attention {attention_name!r}. Use memory='none' for "
        "another attention."
      )
    positional = positional or POSITIONAL[memory]
    if memory != "none" and positional != POSITIONAL[memory]:
      raise ConfigError(
        f"config.model.positional={positional!r} does not work with memory={memory!r}, "
        f"whose positions are {POSITIONAL[memory]!r}; use memory='none' for another scheme."
      )
    if memory == "none":
      positions.check_positional(positional)
    self.memory_kind = memory
    self.positional = positional
    self.segment_length = segment_length
    self.dtype = dtype
    self.embed = TokenEmbedding(
      vocab_size,
      emb_dim,
      max_length=segment_length,
      # The memory stacks place positions themselves (relative, or over
      # [read; segment; write]); rope and alibi act inside the attention.
      positional=positional if memory == "none" else "none",
      rngs=rngs,
      param_dtype=param_dtype,
    )
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    sizes = dict(
      num_layers=num_layers,
      features=emb_dim,
      num_heads=num_heads,
      head_dim=qkv_dim // num_heads,
      mlp_dim=mlp_dim,
      dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    if memory == "none":
      self.stack = CausalDecoder(
        attention_name=attention_name,
        attention_kwargs=positions.with_position(attention_kwargs, positional),
        **sizes,
      )
    elif memory == "transformer_xl":
      self.stack = TransformerXL(mem_len=mem_len, **sizes)
    elif memory == "compressive":
      self.stack = CompressiveTransformer(
        mem_len=mem_len,
        cmem_len=cmem_len,
        compression=compression,
        compression_rate=compression_rate,
        **sizes,
      )
    else:
      self.stack = RecurrentMemoryTransformer(num_memory_tokens=num_memory_tokens, **sizes)
    self.head = nnx.Linear(
      emb_dim,
      vocab_size,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=param_axes("embed", "vocab"),
      bias_metadata=param_axes("vocab"),
      rngs=rngs,
    )

  def init_memory(
    self, batch_size: int, *, mem_len: int | None = None, cmem_len: int | None = None
  ) -> dict:
    """The empty memory of the chosen stack ({} for "none").

    `mem_len` (Transformer-XL kinds) and `cmem_len` (compressive) override the
    configured sizes, e.g. a longer memory at evaluation; kinds without such a
    memory ignore them, so one evaluation config serves every kind.
    """
    lengths = {}
    if self.memory_kind in ("transformer_xl", "compressive"):
      lengths["mem_len"] = mem_len
    if self.memory_kind == "compressive":
      lengths["cmem_len"] = cmem_len
    return self.stack.init_memory(batch_size, **lengths)

  def __call__(
    self,
    ids: jax.Array,
    memory: dict,
    *,
    reset: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict, dict]:
    """One segment.

    Args:
      ids: [batch, seg] int token ids, seg <= segment_length (1 works, for
        token-by-token scoring or generation with the Transformer-XL memory).
      memory: from `init_memory` or the previous call.
      reset: [batch] bool; rows set True start a new stream (memory emptied).
      deterministic: disables dropout.

    Returns:
      (logits [batch, seg, vocab] float32, new_memory, aux) where aux maps
      auxiliary-loss names to scalars ({"attention_reconstruction": ...} for
      "compressive", else {}). Transformer-XL kinds stop gradients at the
      memory; RMT does not (see `run` with bptt_segments).
    """
    mask = ids != 0
    x = self.embed(ids)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = self.dropout(x, deterministic=deterministic)
    y, new_memory, aux = self.stack.call_with_aux(
      x, memory, mask=mask, reset=reset, deterministic=deterministic
    )
    return self.head(y).astype(jnp.float32), new_memory, aux

  def run(
    self,
    ids: jax.Array,
    memory: dict,
    *,
    segment_length: int | None = None,
    reset: jax.Array | None = None,
    bptt_segments: int | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict, dict]:
    """A longer sequence, segment by segment through `__call__`.

    Args:
      ids: [batch, length] with length a multiple of `segment_length`.
      memory: the memory before the first segment.
      segment_length: defaults to the configured one; 1 = token by token.
      reset: [batch] bool, applied before the first segment.
      bptt_segments: RMT's truncation window (see memory.truncated_bptt);
        None = backpropagate through every segment.

    Returns:
      (logits [batch, length, vocab], final memory, aux averaged over segments).
    """
    seg = self.segment_length if segment_length is None else segment_length
    if ids.shape[1] % seg:
      raise ConfigError(
        f"Sequence length {ids.shape[1]} must be a multiple of the segment length {seg}."
      )
    segments = [ids[:, i : i + seg] for i in range(0, ids.shape[1], seg)]
    if reset is not None:
      memory = reset_memory(memory, reset)

    def step(segment, mem):
      return self(segment, mem, deterministic=deterministic)

    results, memory = truncated_bptt(step, segments, memory, bptt_segments=bptt_segments)
    logits = jnp.concatenate([logits for logits, _ in results], axis=1)
    aux = {name: jnp.mean(jnp.stack([a[name] for _, a in results])) for name in results[0][1]}
    return logits, memory, aux
