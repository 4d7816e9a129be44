"""A byte-level decoder language model with a choice of recurrent memory.

`memory` selects the stack between the token embedding and the output head:

  "none"            a plain pre-LN causal decoder: any attention that can be
                    causal (`attention.available(causal=True)`); positions
                    restart every segment; no memory ({}).
  "transformer_xl"  Transformer-XL's memory of mem_len slots per layer, read
                    as a context by any causal attention; positions relative
                    (the paper's, softmax only), rope, alibi or none.
  "compressive"     plus cmem_len compressed slots.
  "rmt"             num_memory_tokens memory vectors over [read; segment;
                    write], with an attention that takes a bias (softmax,
                    dot_product).

All of them are the one `Stack` with a memory option (`memory.make`).

The output head is a separate (untied) Linear [emb_dim, vocab]: the token
embedding is initialized with unit variance, which would make tied logits
start with a spread of about sqrt(emb_dim).

Token ids: byte + 1 in 1..256, 0 = padding (never attended to, never stored as
valid memory); vocab_size 257.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers import memory as recurrent
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import TokenEmbedding, param_axes, positions
from efficient_transformers.memory import reset_memory, truncated_bptt
from efficient_transformers.models.stack import Stack

MEMORY_KINDS = ("none", "transformer_xl", "compressive", "rmt")
# The position schemes token-by-token decoding computes at any position.
DECODE_POSITIONALS = ("none", "sinusoidal", "rope")
# Each memory kind's own position scheme (the default of `positional`).
POSITIONAL = {
  "none": "sinusoidal",
  "transformer_xl": "relative",
  "compressive": "relative",
  "rmt": "sinusoidal",
}


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
    attention_name, attention_kwargs: the attention, as `attention.make` takes
      them; the memory says which it can feed (`memory.check_attention`).
    positional: the position scheme; "" = the memory kind's own (POSITIONAL).
      memory="none" takes any of `layers.positions.POSITIONALS` (sinusoidal,
      learned, axial, rope, alibi, none; positions restart every segment);
      the memories take those of MEMORY_POSITIONALS.
    mem_len: Transformer-XL / compressive memory slots per layer.
    cmem_len, compression, compression_rate: the compressive memory.
    num_memory_tokens: RMT memory vectors.
    reversible, share_layers, scan_layers, remat_policy: the stack's layer
      options (see `Stack`), for memory="none"; with a memory, a value other
      than the default is a ConfigError naming the option and the memory.
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
    reversible: bool = False,
    share_layers: str | int = "none",
    scan_layers: bool = False,
    remat_policy: str = "none",
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if memory not in MEMORY_KINDS:
      raise ConfigError(
        f"memory={memory!r} is not one of {', '.join(MEMORY_KINDS)}.", argument="memory"
      )
    if qkv_dim % num_heads:
      raise ConfigError(
        f"qkv_dim={qkv_dim} must be divisible by num_heads={num_heads}.", argument="qkv_dim"
      )
    if not isinstance(segment_length, int) or segment_length < 1:
      raise ConfigError(
        f"segment_length={segment_length!r} must be an integer >= 1.", argument="segment_length"
      )
    if memory == "compressive" and compression_rate >= 1 and segment_length % compression_rate:
      raise ConfigError(
        f"segment_length={segment_length} must be a multiple of "
        f"compression_rate={compression_rate}.",
        argument="segment_length",
      )
    positional = positional or POSITIONAL[memory]
    _check_positional(memory, positional, attention_name)
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
    memory_kwargs = {
      "none": {},
      "transformer_xl": {"mem_len": mem_len},
      "compressive": {
        "mem_len": mem_len,
        "cmem_len": cmem_len,
        "compression": compression,
        "compression_rate": compression_rate,
      },
      "rmt": {"num_memory_tokens": num_memory_tokens},
    }[memory]
    self.stack = Stack(
      attention_name=attention_name,
      attention_kwargs=_with_scheme(attention_kwargs, positional),
      causal=memory == "none" or recurrent.get_class(memory).causal_stack,
      memory=memory,
      memory_kwargs=memory_kwargs,
      reversible=reversible,
      share_layers=share_layers,
      scan_layers=scan_layers,
      remat_policy=remat_policy,
      **sizes,
    )
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
    if ids.shape[1] > self.segment_length:
      # Before the embedding, whose own error would name max_length.
      raise ConfigError(
        f"A segment of {ids.shape[1]} tokens exceeds segment_length={self.segment_length}.",
        argument="segment_length",
      )
    mask = ids != 0
    x = self.embed(ids)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = self.dropout(x, deterministic=deterministic)
    y, new_memory, aux = self.stack.call_with_aux(
      x, memory, mask=mask, reset=reset, deterministic=deterministic
    )
    return self.head(y).astype(jnp.float32), new_memory, aux

  def init_decode_state(self, batch_size: int) -> dict:
    """The empty state of token-by-token decoding (`decode_step`, `decode`).

    memory='none' with a mixer or attention that has a recurrent form
    (lstm, gru, s4d, lru, s5 and the causal linear and performer attentions):
    the state is O(1) in the context length. A ConfigError names the setting
    otherwise.
    """
    if self.memory_kind == "none" and self.positional not in DECODE_POSITIONALS:
      raise ConfigError(
        f"positional={self.positional!r}: token-by-token decoding takes "
        f"{', '.join(DECODE_POSITIONALS)}.",
        argument="positional",
      )
    return {"position": jnp.zeros((), jnp.int32), "layers": self.stack.init_state(batch_size)}

  def decode_step(self, ids_t: jax.Array, state: dict) -> tuple[jax.Array, dict]:
    """One token per row: ids_t [batch] -> (next-token logits [batch, vocab] float32, state).

    Padding (id 0) leaves a row's state as it was. Positions count from the state's
    start and, unlike segments, never restart: decoding a segment from a fresh state
    equals `__call__` on it (tested), and goes on past `segment_length`.
    """
    x = self.embed.embed_at(ids_t, state["position"])
    if self.dtype is not None:
      x = x.astype(self.dtype)
    y, layers = self.stack.step(x, state["layers"], real=ids_t != 0)
    logits = self.head(y).astype(jnp.float32)
    return logits, {"position": state["position"] + 1, "layers": layers}

  def decode(self, ids: jax.Array, state: dict) -> tuple[jax.Array, dict]:
    """`decode_step` over ids [batch, length], one `lax.scan`: (logits [batch, length,
    vocab], the state after the last token). Memory is O(1) in length besides the logits."""

    def body(state, ids_t):
      logits, state = self.decode_step(ids_t, state)
      return state, logits

    state, logits = jax.lax.scan(body, state, jnp.swapaxes(ids, 0, 1))
    return jnp.swapaxes(logits, 0, 1), state

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
        f"Sequence length {ids.shape[1]} must be a multiple of the segment length {seg}.",
        argument="segment_length",
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


def _with_scheme(attention_kwargs: dict | None, positional: str) -> dict:
  """The attention kwargs with position= for the schemes that act inside attention."""
  kwargs = dict(attention_kwargs or {})
  if positional in ("rope", "alibi", "relative"):
    kwargs["position"] = positional
  return kwargs


# The position schemes each memory kind combines with. Transformer-XL's memory
# needs positions that are relative (absolute ones restart every segment, so a
# memory slot and a token of this segment would share positions): its own
# relative ones (softmax), RoPE or ALiBi, both relative too, or none. RMT places
# sinusoids over [read; segment; write] itself.
MEMORY_POSITIONALS = {
  "none": positions.POSITIONALS,
  "transformer_xl": ("relative", "rope", "alibi", "none"),
  "compressive": ("relative", "rope", "alibi", "none"),
  "rmt": ("sinusoidal",),
}


def _check_positional(memory: str, positional: str, attention_name: str) -> None:
  valid = MEMORY_POSITIONALS[memory]
  if positional not in valid:
    raise ConfigError(
      f"positional={positional!r} does not work with memory={memory!r}; valid: {', '.join(valid)}.",
      argument="positional",
    )
  if positional == "relative" and attention_name != "softmax":
    raise ConfigError(
      f"positional='relative' (Transformer-XL's) needs attention 'softmax'; "
      f"with attention {attention_name!r} use positional='rope', 'alibi' or 'none'.",
      argument="positional",
    )
