"""The pre-LayerNorm Transformer encoder that every attention variant plugs into.

One encoder for every variant (the original LRA code copied it per model): token
and position embeddings, then the shared `Stack` with the attention chosen by name.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import ACTIVATION_AXES, TokenEmbedding, constrain, param_axes
from efficient_transformers.layers.positions import with_position
from efficient_transformers.models.stack import Block, Stack

# The block every model shares, under the name it had before `Stack` existed.
EncoderBlock = Block


class Encoder(nnx.Module):
  """Token ids [batch, length] -> contextual features [batch, length', features].

  With `use_cls`, a learned CLS vector is prepended (length' = length + 1) and
  counted as a real token in the mask. Padding is token id 0.
  `reversible`, `share_layers`, `scan_layers`, `remat_policy`, `heads_per_layer`: the
  stack's layer options (see `Stack`); with `heads_per_layer` every head keeps
  head_dim = qkv_dim // num_heads.
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
    reversible: bool = False,
    share_layers: str | int = "none",
    scan_layers: bool = False,
    remat_policy: str = "none",
    heads_per_layer: tuple[int, ...] | None = None,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if qkv_dim % num_heads:
      raise ConfigError(
        f"qkv_dim={qkv_dim} must be divisible by num_heads={num_heads}.", argument="qkv_dim"
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
    self.stack = Stack(
      num_layers=num_layers,
      features=emb_dim,
      num_heads=num_heads,
      head_dim=qkv_dim // num_heads,
      mlp_dim=mlp_dim,
      attention_name=attention_name,
      attention_kwargs=with_position(attention_kwargs, positional),
      dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate,
      causal=causal,
      reversible=reversible,
      share_layers=share_layers,
      scan_layers=scan_layers,
      remat_policy=remat_policy,
      heads_per_layer=heads_per_layer,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
    )

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
    return self.stack(x, mask=mask, deterministic=deterministic), mask
