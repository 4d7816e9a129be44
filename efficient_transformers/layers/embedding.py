"""Token embeddings and positional encodings.

Shapes: token ids [batch, length] int -> embeddings [batch, length, embed].
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers.partitioning import param_axes
from efficient_transformers.layers.positions import AxialPositions, check_positional


def sinusoidal_table(length: int, features: int, *, max_timescale: float = 10_000.0) -> np.ndarray:
  """The fixed sin/cos table of Vaswani et al. (2017), [length, features] float32.

  Built with numpy at trace time, so it is a compile-time constant.
  """
  positions = np.arange(length, dtype=np.float64)[:, None]
  half = features // 2
  timescales = max_timescale ** (np.arange(half, dtype=np.float64) / max(half, 1))
  angles = positions / timescales[None, :]
  table = np.zeros((length, features), dtype=np.float32)
  table[:, :half] = np.sin(angles)
  table[:, half : 2 * half] = np.cos(angles)
  return table


def sinusoid_at(position: jax.Array, features: int, *, max_timescale: float = 10_000.0):
  """Row `position` (a traced int scalar) of `sinusoidal_table`, [features] float32."""
  half = features // 2
  timescales = max_timescale ** (np.arange(half, dtype=np.float64) / max(half, 1))
  angles = position.astype(jnp.float32) * jnp.asarray(1.0 / timescales, jnp.float32)
  row = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])
  return jnp.pad(row, (0, features - 2 * half))


class TokenEmbedding(nnx.Module):
  """Token embedding plus an optional positional encoding.

  Args:
    vocab_size: number of token ids (id 0 is padding by convention).
    features: embedding width.
    max_length: longest sequence accepted (learned positions are this long).
    positional: 'sinusoidal' (fixed), 'learned' (a trained table), 'axial'
      (Reformer's factorized table, `AxialPositions`), or one that adds
      nothing here: 'rope' and 'alibi' (applied inside attention) or 'none'.
  """

  def __init__(
    self,
    vocab_size: int,
    features: int,
    *,
    max_length: int,
    positional: str = "sinusoidal",
    rngs: nnx.Rngs,
    param_dtype: jnp.dtype = jnp.float32,
  ):
    check_positional(positional)
    self.features = features
    self.max_length = max_length
    self.positional = positional
    self.tokens = nnx.Embed(
      vocab_size,
      features,
      embedding_init=nnx.initializers.normal(stddev=1.0),
      param_dtype=param_dtype,
      rngs=rngs,
      embedding_metadata=param_axes("vocab", "embed"),
    )
    if positional == "learned":
      init = nnx.initializers.normal(stddev=0.02)
      self.positions = nnx.Param(
        init(rngs.params(), (max_length, features), param_dtype),
        **param_axes(None, "embed"),
      )
    elif positional == "axial":
      self.axial = AxialPositions(max_length, features, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, ids: jax.Array, *, offset: int = 0) -> jax.Array:
    """Embeds `ids` [batch, length]; positions start at `offset`."""
    length = ids.shape[1]
    if offset + length > self.max_length:
      raise ConfigError(
        f"Sequence of length {offset + length} exceeds max_length={self.max_length}.",
        argument="max_length",
      )
    x = self.tokens(ids)
    if self.positional == "sinusoidal":
      table = sinusoidal_table(self.max_length, self.features)[offset : offset + length]
      x = x + jnp.asarray(table, x.dtype)[None]
    elif self.positional == "learned":
      x = x + self.positions[offset : offset + length][None].astype(x.dtype)
    elif self.positional == "axial":
      x = x + self.axial(length, offset=offset)[None].astype(x.dtype)
    return x

  def embed_at(self, ids: jax.Array, position: jax.Array) -> jax.Array:
    """One token per row, token-by-token decoding: ids [batch] at `position` (a traced
    int scalar) -> [batch, features]. Positions: sinusoidal (computed for any position),
    or none of the embedding's (none, rope, alibi); a learned or axial table is a
    ConfigError (it ends at max_length)."""
    if self.positional in ("learned", "axial"):
      raise ConfigError(
        f"positional={self.positional!r} is a table of max_length={self.max_length} rows; "
        "token-by-token decoding takes positional='sinusoidal', 'rope' or 'none'.",
        argument="positional",
      )
    x = self.tokens(ids)
    if self.positional == "sinusoidal":
      x = x + sinusoid_at(position, self.features).astype(x.dtype)[None]
    return x
