"""Attention variants: pure functions and the NNX modules built by `make`.

    from efficient_transformers import attention
    attention.available()            # ['dot_product', 'memory_efficient', 'softmax', ...]
    layer = attention.make("softmax", in_features=256, num_heads=4, head_dim=64,
                           rngs=nnx.Rngs(0))
    y = layer(x, mask=mask)          # y.shape == x.shape

Importing this package registers every variant.
"""

from efficient_transformers.attention import masking
from efficient_transformers.attention.base import MultiHeadAttention
from efficient_transformers.attention.registry import available, get_class, make, register

# Variant modules register themselves on import.
from efficient_transformers.attention import softmax  # noqa: E402,I001
from efficient_transformers.attention.softmax import softmax_attention

__all__ = [
    "MultiHeadAttention",
    "available",
    "get_class",
    "make",
    "masking",
    "register",
    "softmax",
    "softmax_attention",
]
