"""Position encodings that act inside attention (RoPE, ALiBi) and Reformer's axial table.

`model.positional` picks one scheme for a model:

  sinusoidal, learned, axial   added to the token embeddings (`TokenEmbedding`);
  rope                         rotates queries and keys inside every attention
                               whose kernel takes q and k (`rotate`);
  alibi                        an additive bias -slope_h |i - j| on the logits of
                               the variants that take one (`alibi_slopes`);
  none                         no positions at all.

Shapes: q, k [batch, length, heads, head_dim].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers.partitioning import param_axes

ADDITIVE = ("sinusoidal", "learned", "axial")  # Added to the embeddings.
IN_ATTENTION = ("rope", "alibi")  # Applied by the attention module.
POSITIONALS = (*ADDITIVE, *IN_ATTENTION, "none")

ROPE_BASE = 10_000.0


def check_positional(value) -> None:
  """Raises ConfigError unless `value` is one of POSITIONALS."""
  if value not in POSITIONALS:
    raise ConfigError(
      f"positional must be one of {', '.join(POSITIONALS)}; got {value!r}.", argument="positional"
    )


def rope_angles(positions: np.ndarray, head_dim: int, base: float = ROPE_BASE) -> np.ndarray:
  """Rotation angles [len(positions), head_dim / 2]: position p, pair i -> p * base^(-2i/d)."""
  if head_dim % 2:
    raise ConfigError(
      f"rope needs an even head_dim (qkv_dim / num_heads); got {head_dim}.", argument="qkv_dim"
    )
  inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  return np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]


def rotate(
  x: jax.Array, *, offset: int = 0, at: np.ndarray | None = None, base: float = ROPE_BASE
) -> jax.Array:
  """RoPE (Su et al., RoFormer): rotates pair i of every position p by p * base^(-2i/d).

  Pairs are the two halves of the head dimension, (x[..., i], x[..., i + d/2]),
  the "rotate half" layout of GPT-NeoX and LLaMA (the paper pairs neighbouring
  features; the two are a fixed permutation of the features apart). Then
  rotate(q, p) . rotate(k, s) depends on p - s only.

  Args:
    x: [batch, length, heads, head_dim], head_dim even.
    offset: the position of x[:, 0]: an int, or a traced int32 scalar (token-by-token
      decoding, where the position is part of the loop's state).
    at: instead of offset, the positions of x's rows (e.g. Longformer's global
      tokens), a sequence of ints of x's length.
    base: the wavelength base.

  Returns:
    x rotated, in x's dtype (the angles are float32: constants for an int offset,
    computed in float32 for a traced one).
  """
  length, head_dim = x.shape[1], x.shape[-1]
  if at is None and isinstance(offset, jax.Array):
    inv_freq = rope_angles(np.ones(1), head_dim, base)[0]  # [head_dim / 2]
    where = offset.astype(jnp.float32) + jnp.arange(length, dtype=jnp.float32)
    angles = where[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  else:
    where = np.arange(offset, offset + length) if at is None else np.asarray(at)
    angles = rope_angles(where, head_dim, base)
    cos = jnp.asarray(np.cos(angles), jnp.float32)[None, :, None, :]
    sin = jnp.asarray(np.sin(angles), jnp.float32)[None, :, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return out.astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's per-head slopes (Press et al. 2022), float32 [num_heads].

  For n heads a power of two: 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise the
  paper's rule: the slopes of the next lower power of two, then every other
  slope of twice that many.
  """

  def power_of_two(n):
    start = 2 ** (-8 / n)
    return [start ** (i + 1) for i in range(n)]

  if num_heads < 1:
    raise ConfigError(f"alibi needs num_heads >= 1; got {num_heads}.", argument="num_heads")
  lower = 2 ** math.floor(math.log2(num_heads))
  slopes = power_of_two(lower)
  if lower < num_heads:
    slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
  return np.asarray(slopes, np.float32)


def alibi_bias(slopes: jax.Array, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
  """-slope_h |i - j| for query positions i and key positions j: [heads, *i.shape, *j.shape]
  broadcast as [heads, ..., q, k] when i is [..., q, 1] and j is [..., 1, k]."""
  distance = jnp.abs(q_positions - k_positions).astype(jnp.float32)
  slopes = jnp.asarray(slopes, jnp.float32).reshape(-1, *([1] * distance.ndim))
  return -slopes * distance[None]


def alibi_bias_for(slopes: jax.Array, q_length: int, kv_length: int) -> jax.Array:
  """The dense ALiBi bias [heads, q_length, kv_length]; query i sits at key position
  i + kv_length - q_length (the end of the keys, as with a memory before the queries)."""
  q_pos = jnp.arange(q_length)[:, None] + (kv_length - q_length)
  return alibi_bias(slopes, q_pos, jnp.arange(kv_length)[None, :])


def axial_shape(max_length: int) -> tuple[int, int]:
  """(rows, columns) with rows * columns >= max_length, both about sqrt(max_length)."""
  rows = max(1, math.isqrt(max_length - 1) + 1) if max_length > 1 else 1
  return rows, -(-max_length // rows)


class AxialPositions(nnx.Module):
  """Reformer's factorized (axial) position embedding.

  Position p = r * columns + c gets concat(E_rows[r], E_columns[c]), with
  E_rows [rows, features - features // 2] and E_columns [columns, features // 2]:
  rows * (features - features // 2) + columns * (features // 2) parameters
  instead of max_length * features. For 4K positions of width 512 (64 x 64):
  64 * 256 + 64 * 256 = 32,768 against 2,097,152 for a learned table.

  Args:
    max_length: positions covered; rows x columns from `axial_shape`.
    features: embedding width (>= 2).
  """

  def __init__(self, max_length: int, features: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    if features < 2:
      raise ConfigError(
        f"axial positions need features (emb_dim) >= 2; got {features}.", argument="emb_dim"
      )
    self.shape = axial_shape(max_length)
    init = nnx.initializers.normal(stddev=0.02)
    rows, columns = self.shape
    self.rows = nnx.Param(
      init(rngs.params(), (rows, features - features // 2), param_dtype),
      **param_axes(None, "embed"),
    )
    self.columns = nnx.Param(
      init(rngs.params(), (columns, features // 2), param_dtype),
      **param_axes(None, "embed"),
    )

  def __call__(self, length: int, *, offset: int = 0) -> jax.Array:
    """The embeddings of positions offset..offset+length-1: [length, features]."""
    p = np.arange(offset, offset + length)
    columns = self.shape[1]
    rows = self.rows[...][p // columns]
    cols = self.columns[...][p % columns]
    return jnp.concatenate([rows, cols], axis=-1)


def with_position(attention_kwargs: dict | None, positional: str) -> dict:
  """The attention kwargs for a model whose `positional` is `positional`: adds
  `position=positional` for the schemes applied inside attention (rope, alibi)."""
  check_positional(positional)
  kwargs = dict(attention_kwargs or {})
  if positional in IN_ATTENTION:
    kwargs["position"] = positional
  return kwargs
