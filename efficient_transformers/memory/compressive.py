"""Compressive Transformer (Rae et al., 2020): a second, compressed memory behind the XL one.

Each segment of length seg pushes seg layer inputs into the XL memory and so
evicts its seg oldest slots; those are compressed by `compression_rate` c into
seg / c slots that enter the compressed memory (also a FIFO, newest last).
Attention sees [compressed; memory; segment] with relative positions over that
concatenation. Memory pytree:

  {"hidden": [layers, batch, mem_len, features], "valid": [batch, mem_len],
   "compressed": [layers, batch, cmem_len, features], "compressed_valid": [batch, cmem_len]}

Evicted slots that are not a whole chunk of c: the simplest correct choice is to
make that impossible. The segment length must be a multiple of c (ConfigError
otherwise), so every call evicts whole chunks. A chunk's slots that are empty or
padding are zeroed before compression, and the compressed slot is valid if any
slot of its chunk was.

Compression functions (`compression`): "conv" (a learned 1-D convolution with
kernel size and stride c, one per layer), "mean" and "max" pooling (no
parameters).

The attention-reconstruction loss (the paper's auxiliary loss): for each layer,
content attention (q.k, without the relative term, as in the paper) of the
segment's normalized inputs over the normalized evicted memories, against the
same over their compression; mean squared difference, averaged over layers.
Everything but the compression network is under `stop_gradient`, so this loss
trains only the compressors, and the language-model loss never reaches them
(compressed memories are only read in later segments, behind the memory's
stop-gradient).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import param_axes
from efficient_transformers.memory.registry import register
from efficient_transformers.memory.transformer_xl import TransformerXLMemory, check_mem_len, push

COMPRESSIONS = ("conv", "mean", "max")


def _frozen_layer_norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
  """`norm(x)` with its scale and bias under stop_gradient."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + norm.epsilon)
  y = y * jax.lax.stop_gradient(norm.scale[...]) + jax.lax.stop_gradient(norm.bias[...])
  return y.astype(x.dtype)


def _frozen_projection(linear: nnx.LinearGeneral, x: jax.Array) -> jax.Array:
  """[batch, n, features] -> [batch, n, heads, head_dim] with stopped kernel and bias."""
  out = jnp.einsum("bnf,fhd->bnhd", x, jax.lax.stop_gradient(linear.kernel[...]).astype(x.dtype))
  if linear.bias is not None:
    out = out + jax.lax.stop_gradient(linear.bias[...]).astype(x.dtype)
  return out


def _content_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array) -> jax.Array:
  """Non-causal softmax(q.k) v with key padding; rows without keys are 0. [b, n, h, d]."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  keep = kv_mask[:, None, None, :]
  weights = jax.nn.softmax(jnp.where(keep, logits, -1e30), axis=-1)
  weights = jnp.where(keep.any(-1, keepdims=True), weights, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32))


@register("compressive")
class CompressiveMemory(TransformerXLMemory):
  """Transformer-XL's memory plus a compressed memory of evicted layer inputs.

  Args:
    num_layers, features, mem_len, stop_memory_gradient: as TransformerXLMemory.
    cmem_len: compressed slots per layer made by `init_memory`.
    compression_rate: c, evicted slots per compressed slot.
    compression: "conv", "mean" or "max".
  """

  def __init__(
    self,
    *,
    num_layers: int,
    features: int,
    mem_len: int,
    cmem_len: int,
    compression_rate: int,
    compression: str = "conv",
    stop_memory_gradient: bool = True,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    super().__init__(
      num_layers=num_layers,
      features=features,
      mem_len=mem_len,
      stop_memory_gradient=stop_memory_gradient,
      dtype=dtype,
    )
    check_mem_len("cmem_len", cmem_len)
    if not isinstance(compression_rate, int) or compression_rate < 1:
      raise ConfigError(
        f"memory 'compressive': compression_rate={compression_rate!r} must be an integer >= 1.",
        argument="compression_rate",
      )
    if compression not in COMPRESSIONS:
      raise ConfigError(
        f"memory 'compressive': compression={compression!r} is not one of "
        f"{', '.join(COMPRESSIONS)}.",
        argument="compression",
      )
    self.cmem_len = cmem_len
    self.compression_rate = compression_rate
    self.compression = compression
    self.compressors = nnx.List(
      [
        nnx.LinearGeneral(
          (compression_rate, features),
          features,
          axis=(-2, -1),
          dtype=self.dtype,
          param_dtype=param_dtype,
          kernel_metadata=param_axes(None, "embed", None),
          bias_metadata=param_axes(None),
          rngs=rngs,
        )
        for _ in range(self.num_layers if compression == "conv" else 0)
      ]
    )

  def init_memory(
    self, batch_size: int, *, mem_len: int | None = None, cmem_len: int | None = None
  ) -> dict:
    """An empty memory; lengths override the configured ones (e.g. longer at eval)."""
    memory = super().init_memory(batch_size, mem_len=mem_len)
    cmem_len = self.cmem_len if cmem_len is None else cmem_len
    check_mem_len("cmem_len", cmem_len)
    shape = (self.num_layers, batch_size, cmem_len, self.features)
    memory["compressed"] = jnp.zeros(shape, memory["hidden"].dtype)
    memory["compressed_valid"] = jnp.zeros((batch_size, cmem_len), bool)
    return memory

  def compress(self, layer: int, evicted: jax.Array) -> jax.Array:
    """Layer `layer`'s compression: [batch, n, features] -> [batch, n / c, features]."""
    batch, n, features = evicted.shape
    c = self.compression_rate
    chunks = evicted.reshape(batch, n // c, c, features)
    if self.compression == "conv":
      return self.compressors[layer](chunks)
    if self.compression == "mean":
      return chunks.mean(axis=2)
    return chunks.max(axis=2)

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
    """One segment; returns (y, new_memory, {"attention_reconstruction": scalar}).

    Shapes as `TransformerXLMemory.run`; the segment length must be a multiple of
    `compression_rate`. The reconstruction loss uses the blocks' attention
    projections, so it needs an attention with query/key/value projections
    (every registered variant has them).
    """
    seg, c = x.shape[1], self.compression_rate
    if seg % c:
      raise ConfigError(
        f"memory 'compressive': segment_length={seg} must be a multiple of "
        f"compression_rate={c} (the compressive memory evicts whole chunks).",
        argument="segment_length",
      )
    memory, mask = self.prepare(x, memory, mask, reset)
    context_mask = jnp.concatenate([memory["compressed_valid"], memory["valid"]], axis=1)
    contexts = [
      jnp.concatenate([cm, m], axis=1)
      for cm, m in zip(memory["compressed"], memory["hidden"], strict=True)
    ]
    y, inputs = self.run_blocks(stack, x, contexts, context_mask, mask, deterministic)

    valid, evicted_valid = push(memory["valid"], mask)
    chunk_valid = evicted_valid.reshape(x.shape[0], seg // c, c).any(axis=-1)
    compressed_valid = push(memory["compressed_valid"], chunk_valid)[0]
    hidden, compressed, losses = [], [], []
    for layer, new in enumerate(inputs):
      kept, evicted = push(memory["hidden"][layer], new)
      # Evicted slots come from the memory or, when seg > mem_len, straight from
      # this segment's inputs; either way the compressor must not train the stack.
      evicted = jax.lax.stop_gradient(jnp.where(evicted_valid[..., None], evicted, 0))
      squeezed = self.compress(layer, evicted)
      hidden.append(kept)
      compressed.append(push(memory["compressed"][layer], squeezed)[0])
      losses.append(
        self._reconstruction_loss(
          stack.blocks[layer], new, evicted, evicted_valid, squeezed, chunk_valid
        )
      )
    new_memory = {
      "hidden": jnp.stack(hidden),
      "valid": valid,
      "compressed": jnp.stack(compressed),
      "compressed_valid": compressed_valid,
    }
    aux = {"attention_reconstruction": jnp.mean(jnp.stack(losses))}
    return y, self.finish(new_memory), aux

  def _reconstruction_loss(self, block, x, old, old_valid, squeezed, squeezed_valid):
    """Mean squared difference of content attention over `old` vs over `squeezed`."""
    attention = block.attention
    queries = _frozen_layer_norm(block.attention_norm, jax.lax.stop_gradient(x))
    q = _frozen_projection(attention.query, queries)

    def attend(memories, valid):
      normed = _frozen_layer_norm(block.attention_norm, memories)
      k = _frozen_projection(attention.key, normed)
      v = _frozen_projection(attention.value, normed)
      return _content_attention(q, k, v, valid)

    target = jax.lax.stop_gradient(attend(old, old_valid))
    return jnp.mean(jnp.square(target - attend(squeezed, squeezed_valid)))
