"""Mask helpers shared by the pure attention functions.

Conventions (DESIGN.md, the attention contract):
  q, k, v: [batch, length, heads, head_dim]
  mask:    [batch, kv_length] bool, True = real token (key padding)
"""

import jax
import jax.numpy as jnp


def large_negative(dtype) -> float:
  """A finite stand-in for -inf in `dtype`, safe to add to logits."""
  return float(jnp.finfo(dtype).min) / 2


def logits_bias(
  mask: jax.Array | None,
  *,
  q_length: int,
  kv_length: int,
  causal: bool,
  q_offset: jax.Array | int = 0,
  kv_offset: jax.Array | int = 0,
) -> jax.Array | None:
  """Boolean keep-mask [batch or 1, 1, q_block, kv_block] for a (sub)block of logits.

  Args:
    mask: [batch, kv_length_total] key padding, True = real; or None.
      When offsets are given, `mask` must already be sliced to this kv block.
    q_length, kv_length: the block's sizes.
    causal: whether query i may see only keys j <= i (absolute positions).
    q_offset, kv_offset: absolute position of the block's first row/column.

  Returns:
    A bool array broadcastable to [batch, heads, q_length, kv_length], or None
    when nothing is masked.
  """
  keep = None
  if mask is not None:
    keep = mask[:, None, None, :kv_length]
  if causal:
    qi = q_offset + jnp.arange(q_length)[:, None]
    kj = kv_offset + jnp.arange(kv_length)[None, :]
    c = (kj <= qi)[None, None]
    keep = c if keep is None else keep & c
  return keep


def zero_padded_queries(out: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Zeroes query rows at padded positions (self-attention, q_len == kv_len).

  Args:
    out: [batch, q_length, heads, head_dim].
    mask: [batch, kv_length] key padding or None. Applied to queries only when
      q_length == kv_length, i.e. self-attention over the same sequence.
  """
  if mask is None or mask.shape[1] != out.shape[1]:
    return out
  return jnp.where(mask[:, :, None, None], out, jnp.zeros((), out.dtype))


def check_qkv(name: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None):
  """Validates shapes against the contract; raises ValueError naming `name`."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"{name}: q, k, v must be [batch, length, heads, head_dim]; got shapes "
      f"{q.shape}, {k.shape}, {v.shape}."
    )
  if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
    raise ValueError(f"{name}: incompatible q {q.shape}, k {k.shape}, v {v.shape}.")
  if mask is not None and (mask.ndim != 2 or mask.shape != k.shape[:2]):
    raise ValueError(f"{name}: mask must be [batch, kv_length] = {k.shape[:2]}; got {mask.shape}.")


def pad_to(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads (False for bool) axis 1 of `x` up to `length`."""
  extra = length - x.shape[1]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, extra)
  return jnp.pad(x, widths)
