"""A classifier that reads a long input segment by segment, carrying a recurrent memory.

The Recurrent Memory Transformer recipe (Bulatov et al., 2022) on the bidirectional
encoder: `num_memory_tokens` memory vectors are prepended to every segment, the encoder
(any registered attention variant, built by name exactly as in `Encoder`) runs over
[memory; segment], and its outputs at the memory positions become the next memory. The
classifier head reads only the final memory, so everything it knows about early segments
came through the memory. Attention cost is that of one segment of
`num_memory_tokens + segment_length` positions, whatever the input length.

Conventions, chosen here and relied on by the tests:
- Padding: token id 0. An input whose length is not a multiple of `segment_length` is
  right-padded with 0 to the next multiple (the same result as if the data had been padded
  so). A segment with no real token leaves its row's memory unchanged, so appending
  padding never changes the logits (a row with no real token at all is classified from
  the initial memory).
- Positions restart in every segment: each segment is embedded as a sequence of
  `num_memory_tokens + segment_length` positions; the memory slots hold positions
  0..num_memory_tokens-1 and get no positional encoding added (like Encoder's CLS), the
  segment's tokens take positions num_memory_tokens.. onward.
- The carried memory is the encoder's final LayerNorm output at the memory positions, so
  its scale stays fixed however many segments are read.
- The loop is one `jax.lax.scan` over the stacked segments (one compiled body). With
  `remat` (`jax.checkpoint` of the per-segment step) the backward pass keeps only the
  memory between segments, [num_memory_tokens, emb_dim] per segment per row, and
  recomputes one segment's activations at a time; without it the scan saves every
  segment's activations (still linear in length, never quadratic).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import (
  ACTIVATION_AXES,
  TokenEmbedding,
  constrain,
  param_axes,
)
from efficient_transformers.layers.positions import with_position
from efficient_transformers.models.heads import POOLINGS, ClassifierHead, pool
from efficient_transformers.models.stack import Stack


def _check_config(
  *,
  segment_length: int,
  num_memory_tokens: int,
  bptt_segments: int | None,
  qkv_dim: int,
  num_heads: int,
  pooling: str,
) -> None:
  if not isinstance(segment_length, int) or segment_length <= 0:
    raise ConfigError(
      f"segment_length={segment_length!r} must be a positive integer.",
      argument="segment_length",
    )
  if not isinstance(num_memory_tokens, int) or num_memory_tokens < 1:
    raise ConfigError(
      f"num_memory_tokens={num_memory_tokens!r} must be an integer >= 1.",
      argument="num_memory_tokens",
    )
  if bptt_segments is not None and (not isinstance(bptt_segments, int) or bptt_segments < 1):
    raise ConfigError(
      f"bptt_segments={bptt_segments!r} must be None (backpropagate through all segments) "
      "or an integer >= 1.",
      argument="bptt_segments",
    )
  if qkv_dim % num_heads:
    raise ConfigError(
      f"qkv_dim={qkv_dim} must be divisible by num_heads={num_heads}.", argument="qkv_dim"
    )
  if pooling not in POOLINGS:
    raise ConfigError(
      f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}.", argument="pooling"
    )


class SegmentedClassifier(nnx.Module):
  """ids [batch, length] -> logits [batch, num_classes], read segment by segment.

  Args:
    segment_length: tokens per segment (the input is right-padded with 0 to a multiple).
    num_memory_tokens: memory vectors carried between segments (>= 1).
    bptt_segments: None backpropagates through every segment; k stops the gradient at the
      memory so that each row's loss reaches only its last k real (non-padding) segments
      (truncated backpropagation through time; the loss reads the final memory only, so
      windows are counted back from each row's last real segment).
    remat: rematerialize each segment's activations in the backward pass, so the scan
      saves only the memory between segments.
    pooling: how the head reads the final memory [batch, num_memory_tokens, emb_dim]:
      'mean' (the mean of the memory vectors) or 'cls' (the first memory vector).
    positional: as in `Encoder`, over `num_memory_tokens + segment_length` positions that
      restart in every segment.
    reversible, share_layers, scan_layers, remat_policy: the stack's layer options
      (see `Stack`).
    The other arguments are those of `EncoderClassifier`; `max_length` bounds the whole
    input's length, not a segment's.
  """

  input_names = ("inputs",)

  def __init__(
    self,
    *,
    vocab_size: int,
    max_length: int,
    num_layers: int,
    emb_dim: int,
    num_heads: int,
    qkv_dim: int,
    mlp_dim: int,
    num_classes: int,
    classifier_dim: int,
    segment_length: int,
    num_memory_tokens: int,
    bptt_segments: int | None = None,
    remat: bool = False,
    attention_name: str = "softmax",
    attention_kwargs: dict | None = None,
    dropout_rate: float = 0.1,
    attention_dropout_rate: float = 0.1,
    pooling: str = "mean",
    positional: str = "sinusoidal",
    reversible: bool = False,
    share_layers: str | int = "none",
    scan_layers: bool = False,
    remat_policy: str = "none",
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    _check_config(
      segment_length=segment_length,
      num_memory_tokens=num_memory_tokens,
      bptt_segments=bptt_segments,
      qkv_dim=qkv_dim,
      num_heads=num_heads,
      pooling=pooling,
    )
    self.max_length = max_length
    self.segment_length = segment_length
    self.num_memory_tokens = num_memory_tokens
    self.bptt_segments = bptt_segments
    self.remat = bool(remat)
    self.pooling = pooling
    self.dtype = dtype
    # The carry's dtype must not change across scan iterations.
    self.memory_dtype = jnp.dtype(dtype if dtype is not None else param_dtype)
    self.embed = TokenEmbedding(
      vocab_size,
      emb_dim,
      max_length=num_memory_tokens + segment_length,
      positional=positional,
      rngs=rngs,
      param_dtype=param_dtype,
    )
    # Unit scale, like the token embeddings and the (LayerNorm-ed) memory carried later,
    # so the first segment sees a memory of the same scale as every other segment.
    self.initial_memory = nnx.Param(
      nnx.initializers.normal(stddev=1.0)(rngs.params(), (num_memory_tokens, emb_dim), param_dtype),
      **param_axes(None, "embed"),
    )
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.stack = Stack(
      num_layers=num_layers,
      features=emb_dim,
      num_heads=num_heads,
      head_dim=qkv_dim // num_heads,
      mlp_dim=mlp_dim,
      attention_name=attention_name,
      attention_kwargs=with_position(attention_kwargs, positional),
      dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate,
      reversible=reversible,
      share_layers=share_layers,
      scan_layers=scan_layers,
      remat_policy=remat_policy,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.head = ClassifierHead(
      emb_dim, classifier_dim, num_classes, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )

  def start_memory(self, batch_size: int) -> jax.Array:
    """The learned initial memory, [batch_size, num_memory_tokens, emb_dim]."""
    memory = self.initial_memory[...].astype(self.memory_dtype)
    return jnp.broadcast_to(memory[None], (batch_size, *memory.shape))

  def update_memory(
    self, ids: jax.Array, memory: jax.Array, *, deterministic: bool = True
  ) -> jax.Array:
    """One segment: ids [batch, segment_length], memory [batch, M, emb] -> next memory.

    No skipping of padding segments and no gradient truncation here; `__call__` adds both.
    """
    m = self.num_memory_tokens
    x = self.embed(ids, offset=m)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    # Dropout on the fresh token embeddings only: the carried memory would otherwise be
    # dropped again in every segment.
    x = self.dropout(x, deterministic=deterministic)
    x = jnp.concatenate([memory.astype(x.dtype), x], axis=1)
    x = constrain(x, ACTIVATION_AXES)
    mask = jnp.concatenate([jnp.ones((ids.shape[0], m), bool), ids != 0], axis=1)
    return self.stack(x, mask=mask, deterministic=deterministic)[:, :m].astype(self.memory_dtype)

  def segments(self, inputs: jax.Array) -> jax.Array:
    """ids [batch, length] -> [num_segments, batch, segment_length], right-padded with 0."""
    batch, length = inputs.shape
    pad = -length % self.segment_length
    ids = jnp.pad(inputs, ((0, 0), (0, pad)))
    ids = ids.reshape(batch, -1, self.segment_length)
    return jnp.swapaxes(ids, 0, 1)

  def read(self, inputs: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """ids [batch, length] -> the final memory [batch, num_memory_tokens, emb_dim]."""
    batch, length = inputs.shape
    if length > self.max_length:
      raise ConfigError(
        f"Sequence of length {length} exceeds max_length={self.max_length}.",
        argument="max_length",
      )
    segs = self.segments(inputs)
    real = jnp.any(segs != 0, axis=-1)  # [num_segments, batch]
    if self.bptt_segments is None:
      cut = jnp.zeros_like(real)
    else:
      # Counted per row over its real segments, so a row's padding segments neither use up
      # its window nor cut it off: the gradient reaches its last k real segments.
      seen = jnp.cumsum(real, axis=0) - real  # Real segments before this one.
      left = real.sum(axis=0, dtype=jnp.int32)[None] - seen  # This one and the real after.
      cut = real & (seen > 0) & (left % self.bptt_segments == 0)

    graphdef, rng_state, rest = nnx.split(self, nnx.RngState, ...)

    def step(rest, rng_state, memory, ids):
      model = nnx.merge(graphdef, rng_state, rest)
      new_memory = model.update_memory(ids, memory, deterministic=deterministic)
      # Dropout advanced its RNG counters: carry them to the next segment.
      return nnx.state(model, nnx.RngState), new_memory

    if self.remat:
      step = jax.checkpoint(step)

    def body(carry, xs):
      rng_state, memory = carry
      ids, real_i, cut_i = xs
      memory = jnp.where(cut_i[:, None, None], jax.lax.stop_gradient(memory), memory)
      rng_state, new_memory = step(rest, rng_state, memory, ids)
      memory = jnp.where(real_i[:, None, None], new_memory, memory)
      return (rng_state, memory), None

    carry = (rng_state, self.start_memory(batch))
    (rng_state, memory), _ = jax.lax.scan(body, carry, (segs, real, cut))
    if not deterministic:
      # Only dropout moves the RNG counters; an inference call leaves the module as it was
      # (and so may run on a module made outside the current trace).
      nnx.update(self, rng_state)
    return memory

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """ids [batch, length] -> float32 logits [batch, num_classes]."""
    memory = self.read(inputs, deterministic=deterministic)
    everywhere = jnp.ones(memory.shape[:2], bool)
    return self.head(pool(memory, everywhere, self.pooling))
