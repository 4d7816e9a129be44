"""Sequence classifiers: one encoder tower, or two sequences through one shared tower.

`input_names` tells the training system which batch fields a model consumes,
so the train step stays model-agnostic.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.models.encoder import Encoder
from efficient_transformers.models.heads import POOLINGS, ClassifierHead, pool


class _PooledEncoder(nnx.Module):
  """An encoder tower, its pooling, and a head over `head_inputs` pooled vectors."""

  head_inputs = 1

  def __init__(
    self,
    *,
    num_classes: int,
    pooling: str = "cls",
    classifier_dim: int,
    rngs: nnx.Rngs,
    **encoder_kwargs,
  ):
    if pooling not in POOLINGS:
      raise ConfigError(
        f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}.", argument="pooling"
      )
    self.pooling = pooling
    self.encoder = Encoder(use_cls=pooling == "cls", rngs=rngs, **encoder_kwargs)
    self.head = ClassifierHead(
      self.head_inputs * encoder_kwargs["emb_dim"],
      classifier_dim,
      num_classes,
      rngs=rngs,
      dtype=encoder_kwargs.get("dtype"),
      param_dtype=encoder_kwargs.get("param_dtype", jnp.float32),
    )

  def encode(self, ids: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """ids [batch, length] -> pooled features [batch, emb_dim]."""
    x, mask = self.encoder(ids, deterministic=deterministic)
    return pool(x, mask, self.pooling)


class EncoderClassifier(_PooledEncoder):
  """ids [batch, length] -> logits [batch, num_classes] (ListOps, Text, Image, Pathfinder)."""

  input_names = ("inputs",)

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True) -> jax.Array:
    return self.head(self.encode(inputs, deterministic=deterministic))


class DualEncoderClassifier(_PooledEncoder):
  """Two sequences through one shared tower, features [u, v, u*v, u-v] (LRA Retrieval).

  (inputs1, inputs2) [batch, length] each -> logits [batch, num_classes].
  """

  input_names = ("inputs1", "inputs2")
  head_inputs = 4

  def __call__(
    self, inputs1: jax.Array, inputs2: jax.Array, *, deterministic: bool = True
  ) -> jax.Array:
    # One call over both documents stacked on the batch axis: the tower's
    # weights are shared by construction and the two encodings run as one batch.
    both = self.encode(jnp.concatenate([inputs1, inputs2], axis=0), deterministic=deterministic)
    u, v = jnp.split(both, 2, axis=0)
    return self.head(jnp.concatenate([u, v, u * v, u - v], axis=-1))
