"""Building blocks below the models: embeddings, feed-forward, partitioning."""

from efficient_transformers.layers.embedding import TokenEmbedding, sinusoidal_table
from efficient_transformers.layers.feed_forward import FeedForward
from efficient_transformers.layers.partitioning import constrain, param_axes

__all__ = ["FeedForward", "TokenEmbedding", "constrain", "param_axes", "sinusoidal_table"]
