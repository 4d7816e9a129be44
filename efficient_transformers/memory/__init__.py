"""Recurrent memories as options of the one stack: Transformer-XL, Compressive, RMT.

`models.Stack(memory=NAME, memory_kwargs=...)` builds one through `make`, as
attentions are built by name; the stack's blocks then read the memory as a
context (or, for RMT, a pattern bias) through the attention contract. The
memory is an explicit pytree from `stack.init_memory(batch_size)`, and
`stack.call_with_aux(x, memory, *, mask, reset, deterministic)` returns
(y, new_memory, aux losses) (DESIGN.md, the recurrent-memory contract).
`models.TransformerXL`, `models.CompressiveTransformer` and
`models.RecurrentMemoryTransformer` are such stacks with the papers' settings.
"""

from efficient_transformers.memory.compressive import COMPRESSIONS, CompressiveMemory
from efficient_transformers.memory.registry import (
  available,
  check_attention,
  get_class,
  make,
  register,
)
from efficient_transformers.memory.relative import (
  relative_attention,
  relative_shift,
  sinusoidal_relative_encoding,
)
from efficient_transformers.memory.rmt import (
  RMTMemory,
  memory_pattern,
  truncated_bptt,
)
from efficient_transformers.memory.transformer_xl import TransformerXLMemory, reset_memory

__all__ = [
  "COMPRESSIONS",
  "CompressiveMemory",
  "RMTMemory",
  "TransformerXLMemory",
  "available",
  "check_attention",
  "get_class",
  "make",
  "memory_pattern",
  "register",
  "relative_attention",
  "relative_shift",
  "reset_memory",
  "sinusoidal_relative_encoding",
  "truncated_bptt",
]
