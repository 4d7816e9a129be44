"""Recurrent-memory transformers: Transformer-XL, Compressive Transformer, RMT.

Each stack follows the recurrent-memory contract (DESIGN.md):
`stack(x, memory, *, mask=None, reset=None, deterministic=True) -> (y, new_memory)`,
with the memory an explicit pytree from `stack.init_memory(batch_size)`;
`stack.call_with_aux(...)` also returns a dict of auxiliary losses.
"""

from efficient_transformers.memory.compressive import COMPRESSIONS, CompressiveTransformer
from efficient_transformers.memory.relative import (
  relative_attention,
  relative_shift,
  sinusoidal_relative_encoding,
)
from efficient_transformers.memory.rmt import (
  RecurrentMemoryTransformer,
  RMTBlock,
  memory_pattern,
  pattern_attention,
  truncated_bptt,
)
from efficient_transformers.memory.transformer_xl import (
  RelativeMultiHeadAttention,
  TransformerXL,
  XLBlock,
  reset_memory,
)

__all__ = [
  "COMPRESSIONS",
  "CompressiveTransformer",
  "RMTBlock",
  "RecurrentMemoryTransformer",
  "RelativeMultiHeadAttention",
  "TransformerXL",
  "XLBlock",
  "memory_pattern",
  "pattern_attention",
  "relative_attention",
  "relative_shift",
  "reset_memory",
  "sinusoidal_relative_encoding",
  "truncated_bptt",
]
