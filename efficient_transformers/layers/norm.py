"""Layer normalization with logical axis names, shared by every block."""

import jax.numpy as jnp
from flax import nnx

from efficient_transformers.layers.partitioning import param_axes


def layer_norm(features: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
  """nnx.LayerNorm over the last axis, its scale and bias named 'embed' for sharding."""
  return nnx.LayerNorm(
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_metadata=param_axes("embed"),
    bias_metadata=param_axes("embed"),
    rngs=rngs,
  )
