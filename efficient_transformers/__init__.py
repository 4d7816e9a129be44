"""Efficient-attention and recurrent-memory transformers in JAX/Flax NNX.

Layers (imports point downward only):
  attention, layers -> models -> training;  data stands apart from models.
"""

__version__ = "0.1.0"
