"""The one block and the one stack of blocks that every model is built from.

A `Block` is pre-LayerNorm and residual: x + Mixer(LN(x)), then x + MLP(LN(x)).
The mixer is any registered attention variant, built by name through
`attention.make`; a `Stack` is `num_layers` blocks and a final LayerNorm. The
encoder classifiers, the segmented classifier and the decoder LM all run a
`Stack`, so an attention variant (causal or not), a block option or a stack
option reaches every model at once.

Shapes: x [batch, length, features]; mask [batch, length] bool, True = real.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import ACTIVATION_AXES, FeedForward, constrain, layer_norm


class Block(nnx.Module):
  """x + Attention(LN(x)), then x + MLP(LN(x)); shapes [batch, length, features].

  Args:
    features: the residual stream's width.
    num_heads, head_dim: the attention's shape.
    mlp_dim: the MLP's hidden width.
    attention_name, attention_kwargs: the mixer, as `attention.make` takes them.
    dropout_rate: on the residual branches and inside the MLP.
    attention_dropout_rate: on the per-head attention outputs.
    causal: a query sees no later token (a ConfigError for a variant that
      cannot be causal, naming those that can).
  """

  def __init__(
    self,
    *,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    attention_name: str = "softmax",
    attention_kwargs: dict | None = None,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
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
      **dict(attention_kwargs or {}),
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
    self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    h = self.attention(self.attention_norm(x), mask=mask, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.mlp_norm(x), deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    return constrain(x, ACTIVATION_AXES)


class Stack(nnx.Module):
  """`num_layers` Blocks and a final LayerNorm: x [batch, length, features] -> the same.

  Args:
    num_layers: >= 0 (0: the final LayerNorm alone).
    The rest: as `Block`, the same for every layer.
  """

  def __init__(
    self,
    *,
    num_layers: int,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    attention_name: str = "softmax",
    attention_kwargs: dict | None = None,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    causal: bool = False,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if not isinstance(num_layers, int) or num_layers < 0:
      raise ConfigError(f"num_layers must be an integer >= 0; got {num_layers!r}.")
    self.causal = causal
    self.blocks = nnx.List(
      [
        Block(
          features=features,
          num_heads=num_heads,
          head_dim=head_dim,
          mlp_dim=mlp_dim,
          attention_name=attention_name,
          attention_kwargs=attention_kwargs,
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
    self.final_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(
    self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    for block in self.blocks:
      x = block(x, mask=mask, deterministic=deterministic)
    return self.final_norm(x)
