"""Attention variants: pure functions and the NNX modules built by `make`.

    from efficient_transformers import attention
    attention.available()            # ['dot_product', 'memory_efficient', 'softmax', ...]
    layer = attention.make("softmax", in_features=256, num_heads=4, head_dim=64,
                           rngs=nnx.Rngs(0))
    y = layer(x, mask=mask)          # y.shape == x.shape
    weights = layer.attention_weights(x, mask=mask)   # [batch, heads, L, L], for inspection

Importing this package registers every variant (and its attention map, `maps`).
"""

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention
from efficient_transformers.attention.registry import available, get_class, make, register

# isort: split
# Variant modules register themselves on import, so they come after the registry.
from efficient_transformers.attention import (
  bigbird,
  dot_product,
  linear,
  linformer,
  local,
  longformer,
  memory_efficient,
  nystromformer,
  performer,
  reformer,
  sinkhorn,
  softmax,
  sparse,
  synthesizer,
)
from efficient_transformers.attention.bigbird import bigbird_attention, bigbird_pattern
from efficient_transformers.attention.dot_product import dot_product_attention
from efficient_transformers.attention.linear import linear_attention
from efficient_transformers.attention.linformer import linformer_attention
from efficient_transformers.attention.local import local_attention, local_pattern
from efficient_transformers.attention.longformer import longformer_attention, longformer_pattern
from efficient_transformers.attention.maps import attention_weights
from efficient_transformers.attention.memory_efficient import memory_efficient_attention
from efficient_transformers.attention.nystromformer import nystromformer_attention
from efficient_transformers.attention.performer import performer_attention
from efficient_transformers.attention.reformer import reformer_attention
from efficient_transformers.attention.sinkhorn import sinkhorn_attention, sinkhorn_pattern
from efficient_transformers.attention.softmax import softmax_attention
from efficient_transformers.attention.sparse import sparse_attention, sparse_pattern
from efficient_transformers.attention.synthesizer import synthesizer_attention

__all__ = [
  "MultiHeadAttention",
  "attention_weights",
  "available",
  "bigbird",
  "bigbird_attention",
  "bigbird_pattern",
  "dot_product",
  "dot_product_attention",
  "get_class",
  "linear",
  "linear_attention",
  "linformer",
  "linformer_attention",
  "local",
  "local_attention",
  "local_pattern",
  "longformer",
  "longformer_attention",
  "longformer_pattern",
  "make",
  "maps",
  "masking",
  "memory_efficient",
  "memory_efficient_attention",
  "nystromformer",
  "nystromformer_attention",
  "performer",
  "performer_attention",
  "reformer",
  "reformer_attention",
  "register",
  "sinkhorn",
  "sinkhorn_attention",
  "sinkhorn_pattern",
  "softmax",
  "softmax_attention",
  "sparse",
  "sparse_attention",
  "sparse_pattern",
  "synthesizer",
  "synthesizer_attention",
]
