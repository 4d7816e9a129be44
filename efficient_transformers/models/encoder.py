"""The pre-LayerNorm Transformer encoder that every attention variant plugs into.

One encoder for every variant (the original LRA code copied it per model): the
attention is chosen by name through `attention.make`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import (
  ACTIVATION_AXES,
  FeedForward,
  TokenEmbedding,
  constrain,
  layer_norm,
  param_axes,
)


class EncoderBlock(nnx.Module):
  """x + Attention(LN(x)), then x + MLP(LN(x)); shapes [batch, length, features]."""

  def __init__(
    self,
    *,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    attention_name: str,
    attention_kwargs: dict,
    dropout_rate: float,
    attention_dropout_rate: float,
    causal: bool = False,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    self.attention_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention = attention.make(
      attention_name,
      in_features=features,
      num_heads=num_heads,
      head_dim=head_dim,
      dropout_rate=attention_dropout_rate,
      causal=causal,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
      **attention_kwargs,
    )
    self.mlp_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp = FeedForward(
      features,
      mlp_dim,
      dropout_rate=dropout_rate,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(
    self, x: jax.Array, *, mask: jax.Array | None, deterministic: bool = True
  ) -> jax.Array:
    h = self.attention(self.attention_norm(x), mask=mask, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.mlp_norm(x), deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    return constrain(x, ACTIVATION_AXES)


class Encoder(nnx.Module):
  """Token ids [batch, length] -> contextual features [batch, length', features].

  With `use_cls`, a learned CLS vector is prepended (length' = length + 1) and
  counted as a real token in the mask. Padding is token id 0.
  """

  def __init__(
    self,
    *,
    vocab_size: int,
    max_length: int,
    num_layers: int,
    emb_dim: int,
    num_heads: int,
    qkv_dim: int,
    mlp_dim: int,
    attention_name: str = "softmax",
    attention_kwargs: dict | None = None,
    dropout_rate: float = 0.1,
    attention_dropout_rate: float = 0.1,
    positional: str = "sinusoidal",
    use_cls: bool = False,
    causal: bool = False,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if qkv_dim % num_heads:
      raise ConfigError(
        f"config.model.qkv_dim={qkv_dim} must be divisible by model.num_heads={num_heads}."
      )
    self.use_cls = use_cls
    self.dtype = dtype
    self.embed = TokenEmbedding(
      vocab_size,
      emb_dim,
      max_length=max_length + int(use_cls),
      positional=positional,
      rngs=rngs,
      param_dtype=param_dtype,
    )
    if use_cls:
      self.cls = nnx.Param(
        nnx.initializers.normal(stddev=0.02)(rngs.params(), (emb_dim,), param_dtype),
        **param_axes("embed"),
      )
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.blocks = nnx.List(
      [
        EncoderBlock(
          features=emb_dim,
          num_heads=num_heads,
          head_dim=qkv_dim // num_heads,
          mlp_dim=mlp_dim,
          attention_name=attention_name,
          attention_kwargs=dict(attention_kwargs or {}),
          dropout_rate=dropout_rate,
          attention_dropout_rate=attention_dropout_rate,
          causal=causal,
          rngs=rngs,
          dtype=dtype,
          param_dtype=param_dtype,
        )
        for _ in range(num_layers)
      ]
    )
    self.final_norm = layer_norm(emb_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, ids: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Returns (features [batch, length', emb_dim], mask [batch, length'] bool)."""
    mask = ids != 0
    if self.use_cls:
      # The learned CLS vector sits at position 0; tokens take positions 1..L.
      x = self.embed(ids, offset=1)
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
      mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
    else:
      x = self.embed(ids)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = constrain(x, ACTIVATION_AXES)
    x = self.dropout(x, deterministic=deterministic)
    for block in self.blocks:
      x = block(x, mask=mask, deterministic=deterministic)
    return self.final_norm(x), mask
