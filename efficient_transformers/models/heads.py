"""Pooling and classification heads over encoder features."""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import param_axes

POOLINGS = ("cls", "mean")


def pool(x: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """Pools features [batch, length, features] to [batch, features].

  'cls' takes position 0 (the encoder's CLS token). 'mean' averages real
  tokens only: padding is excluded (the original LRA code averaged it in).
  """
  if how == "cls":
    return x[:, 0]
  if how == "mean":
    # Summed in float32: a bf16 sum over thousands of positions loses digits.
    w = mask.astype(jnp.float32)[..., None]
    mean = (x.astype(jnp.float32) * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
    return mean.astype(x.dtype)
  raise ConfigError(f"pooling={how!r} is not one of {', '.join(POOLINGS)}.", argument="pooling")


class ClassifierHead(nnx.Module):
  """LRA's head: Linear(hidden) -> ReLU -> Linear(num_classes)."""

  def __init__(
    self,
    in_features: int,
    hidden: int,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    self.hidden = nnx.Linear(
      in_features,
      hidden,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=param_axes("embed", "mlp"),
      bias_metadata=param_axes("mlp"),
      rngs=rngs,
    )
    self.logits = nnx.Linear(
      hidden,
      num_classes,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=param_axes("mlp", None),
      bias_metadata=param_axes(None),
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, in_features] -> float32 logits [batch, num_classes]."""
    return self.logits(jax.nn.relu(self.hidden(x))).astype(jnp.float32)
