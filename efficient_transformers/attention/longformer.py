"""Longformer attention: a sliding window plus global tokens, computed blockwise.

Beltagy, Peters and Cohan, "Longformer: The Long-Document Transformer" (2020).
Query i sees key j when |i - j| <= w (`window`, one-sided; causal:
i - w <= j <= i), or when i or j is a global position (`global_positions`,
default (0,): the encoder's CLS token). Global tokens attend to every key and
every query attends to the global tokens, in the same softmax as its window
keys; a global key inside the window is counted once. Causal: j <= i in both
directions as well.

As in the paper, the global rows (global tokens attending to everything) use
separate projections q_g, k_g, v_g (`query_global`, `key_global`,
`value_global` in the module); every query attending to the global keys uses
the ordinary k, v.

Computation, with g global positions: the sequence is cut into contiguous
blocks of w tokens (a length that is not a multiple of w is padded internally;
padded keys are masked and padded rows dropped); each query block meets its
own and both neighboring blocks (causal: own and previous), masked exactly to
|i - j| <= w; the g gathered global keys form a second part of the same
softmax (global keys are masked out of the window part, so none is counted
twice; the two parts share one normalizer and are never concatenated). The
g global rows are a separate dense pass of their g queries over all keys,
written over their rows. Cost per
head: O(L (3w + g) d) + O(g L d) time and O(L (3w + g)) + O(g L) memory,
forward and backward (plain autodiff keeps only these logits). No [L, L]
array is built.

The original LRA code emulated Longformer with a dense [L, L] mask (quadratic,
a defect the memory tests rule out), shared one set of projections, and had
no window size of its own: the default `window=64` is this library's choice.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import (
  QKV_BIAS_AXES,
  QKV_KERNEL_AXES,
  MultiHeadAttention,
  defaults_of,
)
from efficient_transformers.attention.local import (
  from_heads_major_blocks,
  heads_major_blocks,
  masked_exp_parts,
  masked_softmax,
  normalize,
  pattern_attention_weights,
  shifted_blocks,
  to_blocks,
  weighted_sum,
  window_parts,
)
from efficient_transformers.attention.masking import pad_to
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_fits_sequence, check_positive_int
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import positions
from efficient_transformers.layers.partitioning import param_axes

_F32 = jnp.float32
_NAME = "longformer"


def _global_tuple(global_positions) -> tuple[int, ...]:
  """Validates `global_positions`; returns them sorted without duplicates."""
  if isinstance(global_positions, int | np.integer) and not isinstance(global_positions, bool):
    global_positions = (global_positions,)
  ok = isinstance(global_positions, Sequence | np.ndarray) and not isinstance(global_positions, str)
  values = list(global_positions) if ok else []
  if not ok or any(
    isinstance(p, bool) or not isinstance(p, int | np.integer) or p < 0 for p in values
  ):
    raise ConfigError(
      f"attention {_NAME!r}: global_positions={global_positions!r} must be a tuple of "
      "non-negative integers.",
      argument="attention_kwargs.global_positions",
    )
  return tuple(sorted({int(p) for p in values}))


def _check_params(window, global_positions) -> tuple[int, ...]:
  check_positive_int(_NAME, "window", window)
  return _global_tuple(global_positions)


def _check_globals_fit(positions: tuple[int, ...], length: int) -> None:
  if positions and positions[-1] >= length:
    raise ConfigError(
      f"attention {_NAME!r}: global_positions={positions} has positions >= the sequence "
      f"length {length}; keep them below {length}.",
      argument="attention_kwargs.global_positions",
    )


def longformer_pattern(
  length: int, *, window: int, global_positions: Sequence[int], causal: bool
) -> np.ndarray:
  """The dense boolean pattern [length, length] that `longformer_attention` computes.

  Query i may see key j when |i - j| <= window, or i or j is global; causal:
  and j <= i. For tests and plots only: it is O(L^2).

  Args:
    length: sequence length L.
    window: one-sided window w.
    global_positions: positions of the global tokens.
    causal: whether query i sees keys j <= i only.

  Returns:
    A numpy bool array [length, length], True = allowed.
  """
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  is_global = np.zeros(length, bool)
  is_global[[p for p in global_positions if p < length]] = True
  allowed = (np.abs(i - j) <= window) | is_global[:, None] | is_global[None, :]
  if causal:
    allowed &= j <= i
  return allowed


def _global_rows(q_g, k_g, v_g, keep, positions, causal) -> jax.Array:
  """Global queries q_g [B, g, H, D] (at `positions`) over every key (k_g, v_g): [B, g, H, D]."""
  logits = jnp.einsum("bghd,bkhd->bhgk", q_g, k_g, preferred_element_type=_F32)
  logits = logits * (q_g.shape[-1] ** -0.5)  # [B, H, g, L]
  keep_rows = keep[:, None, None, :]
  if causal:
    keep_rows = keep_rows & (np.arange(k_g.shape[1])[None, :] <= np.asarray(positions)[:, None])
  weights = masked_softmax(logits, keep_rows)
  return jnp.einsum("bhgk,bkhd->bghd", weights.astype(v_g.dtype), v_g)


def longformer_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  window: int = 64,
  global_positions: Sequence[int] = (0,),
  global_qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """Sliding-window attention plus global tokens (`longformer_pattern`), blockwise.

  Self-attention only (q and k of the same length). A length that is not a
  multiple of `window` is padded internally; the padded keys are masked and
  the padded rows dropped. With `global_qkv=None` the global rows reuse q, k,
  v and the result equals dense masked softmax under `longformer_pattern`.
  Padded global positions (mask False) are ignored as keys and their rows are
  zero.

  Args:
    q, k, v: [batch, length, heads, head_dim].
    mask: [batch, length] bool, True = real token; or None.
    causal: query i sees keys j <= i only (also for global rows and columns).
    window: one-sided window w: query i sees keys with |i - j| <= w.
    global_positions: positions of the global tokens (duplicates ignored).
    global_qkv: optional (q_g, k_g, v_g) for the global rows (global
      queries over all keys): q_g [batch, g, heads, head_dim], the queries of
      the g global positions in sorted order; k_g, v_g [batch, length, heads,
      head_dim]. None reuses q, k, v.

  Returns:
    [batch, length, heads, head_dim] in q's dtype (softmax in float32). Rows
    of padded queries and rows with no visible key are zeros.

  Raises:
    ConfigError: window not a positive integer or larger than the length;
      global_positions not non-negative integers, or >= the length.
    ValueError: shapes off the contract, or q and k of different lengths.
  """
  positions = _check_params(window, global_positions)
  masking.check_qkv(_NAME, q, k, v, mask)
  batch, length = q.shape[:2]
  if k.shape[1] != length:
    raise ValueError(f"{_NAME}: self-attention only; q length {length} != kv length {k.shape[1]}.")
  if global_qkv is not None:
    want = [(batch, len(positions), *q.shape[2:]), k.shape, v.shape]
    if len(global_qkv) != 3 or [tuple(getattr(g, "shape", ())) for g in global_qkv] != want:
      raise ValueError(
        f"{_NAME}: global_qkv must be (q_g, k_g, v_g) shaped {want} (q_g holds the "
        f"global rows only); got {[getattr(g, 'shape', None) for g in global_qkv]}."
      )
  check_fits_sequence(_NAME, "window", window, length)
  _check_globals_fit(positions, length)

  w = window
  num_blocks = -(-length // w)
  n = min(1, num_blocks - 1)
  offsets = range(-n, 1 if causal else n + 1)
  padded = num_blocks * w
  g = len(positions)
  g_idx = np.asarray(positions, np.int32)

  keep = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
  keep_p = pad_to(keep, padded)
  is_global = np.zeros(padded, bool)
  is_global[g_idx] = True
  # Global keys enter through the global columns below; not again in the window.
  keep_window = keep_p & ~is_global[None, :]

  # Window part: the query blocks against each neighbour offset, heads-major, every offset
  # its own [B, H, nb, w, w] logits (`local.shifted_blocks`: never concatenated).
  qb = heads_major_blocks(q, w, padded)  # [B, H, nb, w, D]
  kb, vb = (heads_major_blocks(x, w, padded) for x in (k, v))
  keep_b = to_blocks(keep_window, w)  # [B, nb, w]
  scale = q.shape[-1] ** -0.5
  r = np.arange(w)[:, None]  # query position relative to its block's start

  def band(o):  # [w, w], the same for every block; c: key position, same origin
    c = o * w + np.arange(w)[None, :]
    return (np.abs(r - c) <= w) & ((c <= r) if causal else True)

  parts = window_parts(qb, kb, keep_b, offsets, pattern=band)

  if g:
    # Global columns: every query against the g global keys (ordinary k, v), in
    # the same softmax as the window (more parts, never concatenated).
    kg, vg = k[:, g_idx].transpose(0, 2, 1, 3), v[:, g_idx].transpose(0, 2, 1, 3)  # [B, H, g, D]
    g_logits = jnp.einsum("bhnqd,bhgd->bhnqg", qb, kg, preferred_element_type=_F32) * scale
    g_keep = keep[:, g_idx][:, None, None, None, :]  # [B, 1, 1, 1, g]
    if causal:
      g_keep = g_keep & (g_idx[None, :] <= np.arange(padded)[:, None]).reshape(num_blocks, w, g)
    parts.append((g_logits, g_keep))

  exps, denom = masked_exp_parts(parts)
  out = weighted_sum(exps[: len(offsets)], shifted_blocks(vb, offsets, axis=2))
  if g:
    out = out + jnp.einsum(
      "bhnqg,bhgd->bhnqd", exps[-1].astype(v.dtype), vg, preferred_element_type=_F32
    )
  out = from_heads_major_blocks(normalize(out, denom).astype(q.dtype), length)  # [B, L, H, D]

  if g:
    q_g, k_g, v_g = (q[:, g_idx], k, v) if global_qkv is None else global_qkv
    rows = _global_rows(q_g, k_g, v_g, keep, positions, causal)
    out = out.at[:, g_idx].set(rows.astype(out.dtype))
  return masking.zero_padded_queries(out, mask).astype(q.dtype)


@maps.register_weights(_NAME)
def longformer_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  window: int = 64,
  global_positions: Sequence[int] = (0,),
  global_qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """The map [batch, heads, length, length] float32 of `longformer_attention` (its arguments).

  The masked softmax under `longformer_pattern` and the key mask: window keys and global
  columns in one softmax, global rows over every (real, causal: earlier) key. With
  `global_qkv=None` it is one map over v: its product with v is the output. With
  (q_g, k_g, v_g) the global rows are softmax(q_g k_g^T) and weigh v_g (not v), so the
  output is `map @ v` on the other rows and `map @ v_g` on the global rows (v_g itself is
  not read here). Rows of padded queries and rows with no visible key are zeros.
  Quadratic by nature; for inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length(_NAME, q.shape[1], k.shape[1], max_length)
  positions = _check_params(window, global_positions)
  length = q.shape[1]
  if k.shape[1] != length:
    raise ValueError(f"{_NAME}: self-attention only; q length {length} != kv length {k.shape[1]}.")
  check_fits_sequence(_NAME, "window", window, length)
  _check_globals_fit(positions, length)
  allowed = longformer_pattern(length, window=window, global_positions=positions, causal=causal)
  weights = pattern_attention_weights(q, k, allowed[None, None], mask=mask)
  if positions and global_qkv is not None:
    q_g, k_g = global_qkv[0], global_qkv[1]
    g_idx = np.asarray(positions)
    if q_g.shape != (q.shape[0], len(positions), *q.shape[2:]) or k_g.shape != k.shape:
      raise ValueError(
        f"{_NAME}: global_qkv must be (q_g, k_g, v_g) with q_g {(q.shape[0], len(positions))} + "
        f"{q.shape[2:]} and k_g {k.shape}; got q_g {q_g.shape}, k_g {k_g.shape}."
      )
    rows = pattern_attention_weights(q_g, k_g, allowed[g_idx][None, None], mask=mask)
    weights = weights.at[:, :, g_idx].set(rows)
    if mask is not None:  # Padded global positions: zero rows, as in the kernel.
      weights = jnp.where(mask.astype(bool)[:, None, :, None], weights, 0.0)
  return weights


_DEFAULTS = defaults_of(longformer_attention)


@register(_NAME)
class LongformerAttention(MultiHeadAttention):
  """Multi-head Longformer attention with separate global projections.

  See `longformer_attention`. Besides the base query/key/value/output
  projections the module holds `query_global`, `key_global` and
  `value_global`, used for the global rows. It therefore overrides
  `_self_attention` (the base computes only q, k, v) and `attention_weights`
  (whose global rows weigh `value_global(x)`: apply a map with `apply_weights`);
  `attend` is not used.

  Variant kwargs:
    window: one-sided sliding window w (default 64; LRA had no such size,
      it used a dense mask).
    global_positions: positions of the global tokens (default (0,), the
      encoder's CLS token). Empty: a plain sliding window.
  """

  def __init__(
    self,
    *,
    window: int = _DEFAULTS.window,
    global_positions: Sequence[int] = _DEFAULTS.global_positions,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    positions = _check_params(window, global_positions)
    super().__init__(**common)
    self.window = window
    self.global_positions = positions

    def projection():
      return nnx.LinearGeneral(
        self.in_features,
        (self.num_heads, self.head_dim),
        dtype=self.dtype,
        param_dtype=common.get("param_dtype", jnp.float32),
        kernel_metadata=param_axes(*QKV_KERNEL_AXES),
        bias_metadata=param_axes(*QKV_BIAS_AXES),
        rngs=common["rngs"],
      )

    self.query_global = projection()
    self.key_global = projection()
    self.value_global = projection()

  def pattern(self, length: int) -> np.ndarray:
    """The boolean self-attention pattern [length, length] this module computes."""
    return longformer_pattern(
      length, window=self.window, global_positions=self.global_positions, causal=self.causal
    )

  def attend(self, q, k, v, *, mask, deterministic):
    """Not used: the global rows need the global projections of x (see `__call__`)."""
    raise NotImplementedError(
      "LongformerAttention computes its own projections in __call__; call the module on x."
    )

  def _projections(self, x: jax.Array):
    """q, k, v [batch, length, heads, head_dim] of x, and global_qkv (None without globals)."""
    q, k, v = self.rotate(self.query(x)), self.rotate(self.key(x)), self.value(x)
    global_qkv = None
    if self.global_positions:
      _check_globals_fit(self.global_positions, x.shape[1])  # before the gather below
      # Only the g global rows need global queries.
      rows = x[:, np.asarray(self.global_positions)]
      global_q = self.query_global(rows)
      if self.position_kind == "rope":
        global_q = positions.rotate(global_q, at=self.global_positions)
      global_qkv = (global_q, self.rotate(self.key_global(x)), self.value_global(x))
    return q, k, v, global_qkv

  def attention_weights(
    self, x: jax.Array, *, mask: jax.Array | None = None, max_length: int = maps.MAX_MAP_LENGTH
  ) -> jax.Array:
    """The map [batch, heads, L, L] of self-attention over x [batch, L, in_features].

    Unlike the other variants' maps, its rows at the global positions are the global
    queries' weights over `value_global(x)`, the others' over `value(x)` (see
    `longformer_attention_weights`): `self.out(self.apply_weights(map, x))` is
    `self(x, mask=mask)` (deterministic), up to float error. Quadratic by nature: for
    inspection at short lengths, a ConfigError above `max_length` (see `attention.maps`).
    """
    maps.check_map_length(_NAME, x.shape[1], x.shape[1], max_length)
    q, k, _, global_qkv = self._projections(x)
    return maps.attention_weights(
      _NAME,
      q,
      k,
      mask=mask,
      causal=self.causal,
      max_length=max_length,
      window=self.window,
      global_positions=self.global_positions,
      global_qkv=global_qkv,
    )

  def apply_weights(self, weights: jax.Array, x: jax.Array) -> jax.Array:
    """weights [batch, heads, L, L] (`attention_weights`) applied to x's values: [batch, L,
    heads, head_dim] float32, `value_global(x)` on the global rows and `value(x)` elsewhere."""
    out = maps.apply_weights(weights, self.value(x))
    if not self.global_positions:
      return out
    g_idx = np.asarray(self.global_positions)
    rows = maps.apply_weights(weights[:, :, g_idx], self.value_global(x))
    return out.at[:, g_idx].set(rows)

  def _self_attention(
    self, x: jax.Array, *, mask: jax.Array | None, deterministic: bool
  ) -> jax.Array:
    """Self-attention over `x` [batch, length, in_features]; returns the same shape."""
    q, k, v, global_qkv = self._projections(x)
    out = longformer_attention(
      q,
      k,
      v,
      mask=mask,
      causal=self.causal,
      window=self.window,
      global_positions=self.global_positions,
      global_qkv=global_qkv,
    )
    out = self.dropout(out, deterministic=deterministic)
    return self.out(out)
