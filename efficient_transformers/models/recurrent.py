"""The recurrent-memory models of the papers, as the one `Stack` with a memory option.

Each is `Stack(memory=NAME)` with the paper's attention (softmax; Transformer-XL's
relative positions for the XL kinds) and the recurrent-memory call:
`model(x, memory, *, mask, reset, deterministic) -> (y, new_memory)`, plus
`call_with_aux` (the auxiliary losses) and `init_memory`. Any other causal
attention is `Stack(memory=..., attention_name=..., causal=...)` directly, or
`DecoderLM(memory=..., attention_name=...)`.
"""

import jax
from flax import nnx

from efficient_transformers.models.stack import Stack


class _RecurrentStack(Stack):
  """A Stack with a memory, called as the recurrent-memory contract says."""

  def __call__(
    self,
    x: jax.Array,
    memory: dict,
    *,
    mask: jax.Array | None = None,
    reset: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict]:
    """One segment x [batch, seg, features] -> (y [batch, seg, features], new_memory)."""
    y, new_memory, _ = self.call_with_aux(
      x, memory, mask=mask, reset=reset, deterministic=deterministic
    )
    return y, new_memory


def _sizes(num_layers, features, num_heads, head_dim, mlp_dim, dropout_rate, attn_dropout, rest):
  return dict(
    num_layers=num_layers,
    features=features,
    num_heads=num_heads,
    head_dim=head_dim,
    mlp_dim=mlp_dim,
    dropout_rate=dropout_rate,
    attention_dropout_rate=attn_dropout,
    **rest,
  )


class TransformerXL(_RecurrentStack):
  """Transformer-XL (Dai et al., 2019): softmax with relative positions over [memory; segment].

  Args:
    num_layers, features, num_heads, head_dim, mlp_dim: the block sizes.
    mem_len: memory slots per layer made by `init_memory`.
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
    **rest,
  ):
    super().__init__(
      attention_name="softmax",
      attention_kwargs={"position": "relative"},
      causal=True,
      memory="transformer_xl",
      memory_kwargs={"mem_len": mem_len, "stop_memory_gradient": stop_memory_gradient},
      rngs=rngs,
      **_sizes(
        num_layers,
        features,
        num_heads,
        head_dim,
        mlp_dim,
        dropout_rate,
        attention_dropout_rate,
        rest,
      ),
    )


class CompressiveTransformer(_RecurrentStack):
  """Compressive Transformer (Rae et al., 2020): Transformer-XL plus a compressed memory.

  Args:
    as TransformerXL, plus cmem_len, compression_rate, compression
    (`memory.CompressiveMemory`).
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
    cmem_len: int,
    compression_rate: int,
    compression: str = "conv",
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    stop_memory_gradient: bool = True,
    rngs: nnx.Rngs,
    **rest,
  ):
    super().__init__(
      attention_name="softmax",
      attention_kwargs={"position": "relative"},
      causal=True,
      memory="compressive",
      memory_kwargs={
        "mem_len": mem_len,
        "cmem_len": cmem_len,
        "compression_rate": compression_rate,
        "compression": compression,
        "stop_memory_gradient": stop_memory_gradient,
      },
      rngs=rngs,
      **_sizes(
        num_layers,
        features,
        num_heads,
        head_dim,
        mlp_dim,
        dropout_rate,
        attention_dropout_rate,
        rest,
      ),
    )


class RecurrentMemoryTransformer(_RecurrentStack):
  """Recurrent Memory Transformer, decoder form (Bulatov et al., 2022), with softmax.

  Args:
    as TransformerXL without mem_len, plus num_memory_tokens (`memory.RMTMemory`).
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
    **rest,
  ):
    super().__init__(
      attention_name="softmax",
      causal=False,
      memory="rmt",
      memory_kwargs={"num_memory_tokens": num_memory_tokens},
      rngs=rngs,
      **_sizes(
        num_layers,
        features,
        num_heads,
        head_dim,
        mlp_dim,
        dropout_rate,
        attention_dropout_rate,
        rest,
      ),
    )
