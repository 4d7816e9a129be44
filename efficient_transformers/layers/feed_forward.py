"""The position-wise feed-forward block: Linear -> GELU -> dropout -> Linear."""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.layers.partitioning import param_axes


class FeedForward(nnx.Module):
  """[batch, length, features] -> same shape, through a hidden width `hidden`."""

  def __init__(
    self,
    features: int,
    hidden: int,
    *,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
  ):
    self.up = nnx.Linear(
      features,
      hidden,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=param_axes("embed", "mlp"),
      bias_metadata=param_axes("mlp"),
      rngs=rngs,
    )
    self.down = nnx.Linear(
      hidden,
      features,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=param_axes("mlp", "embed"),
      bias_metadata=param_axes("embed"),
      rngs=rngs,
    )
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    h = jax.nn.gelu(self.up(x))
    h = self.dropout(h, deterministic=deterministic)
    return self.down(h)
