"""Building blocks below the models: embeddings, feed-forward, norms, partitioning."""

from efficient_transformers.layers.embedding import TokenEmbedding, sinusoidal_table
from efficient_transformers.layers.feed_forward import FeedForward
from efficient_transformers.layers.norm import layer_norm
from efficient_transformers.layers.partitioning import ACTIVATION_AXES, constrain, param_axes

__all__ = [
  "ACTIVATION_AXES",
  "FeedForward",
  "TokenEmbedding",
  "constrain",
  "layer_norm",
  "param_axes",
  "sinusoidal_table",
]
