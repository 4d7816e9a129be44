"""Linear attention: a kernel feature map in place of softmax, O(L) time and memory.

Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers
with Linear Attention" (2020). With a positive feature map phi,

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j)),

where j runs over the real keys (all of them, or j <= i when causal); the
sums are computed once instead of forming the [L, L] matrix phi(q) phi(k)^T.
Here phi(x) = elu(x) + 1.

`linear_attention_from_features` is the shared core for every kernelized
attention (Performer's FAVOR+ calls it with random features). Padded keys
have their features zeroed, so they are excluded from both sums: the
original LRA code summed over them. The causal form cuts the sequence into
chunks: inside a chunk one explicit [chunk, chunk] causal product, across
chunks a running state [heads, features, head_dim] carried by `lax.scan`.
Cost per head: O(L m d) time; memory O(L chunk + L m d / chunk) with
autodiff (the scan keeps one state per chunk), never L x L.

`linear_attention_weights` (and `kernelized_attention_weights`, which Performer
shares) builds the [L, L] map phi(q) phi(k)^T with normalised rows, for inspection
at short lengths (`attention.maps`).
"""

import jax
import jax.numpy as jnp
from jax import lax

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention, defaults_of
from efficient_transformers.attention.local import normalize
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_positive_int
from efficient_transformers.errors import ConfigError

_F32 = jnp.float32


def _causal_sums(phi_q, phi_k, v, chunk_size):
  """Numerators [B, H, Lq, Dv] and denominators [B, H, Lq] over keys j <= i; inputs and
  outputs heads-major ([B, H, L, ...]), so each chunk's products need no transpose."""
  q_len = phi_q.shape[2]
  length = max(q_len, phi_k.shape[2])
  chunk = min(chunk_size, length)
  total = -(-length // chunk) * chunk
  num_chunks = total // chunk

  def to_chunks(x):  # [B, H, L, ...] -> [n, B, H, chunk, ...], the scan's leading axis.
    x = jnp.pad(x, [(0, 0), (0, 0), (0, total - x.shape[2])] + [(0, 0)] * (x.ndim - 3))
    return jnp.moveaxis(x.reshape(*x.shape[:2], num_chunks, chunk, *x.shape[3:]), 2, 0)

  # Zero padding: padded keys have zero features (they add nothing), padded
  # query rows are cut off below.
  qs, ks, vs = (to_chunks(x) for x in (phi_q, phi_k, v))
  below = jnp.tril(jnp.ones((chunk, chunk), bool))
  batch, heads, _, features = phi_q.shape

  def step(carry, xs):
    state, normalizer = carry  # [B, H, m, Dv], [B, H, m]: sums over earlier chunks
    qc, kc, vc = xs
    scores = jnp.where(below, jnp.einsum("bhqm,bhkm->bhqk", qc, kc), 0.0)
    num = jnp.einsum("bhqk,bhkd->bhqd", scores, vc) + jnp.einsum("bhqm,bhmd->bhqd", qc, state)
    den = scores.sum(axis=-1) + jnp.einsum("bhqm,bhm->bhq", qc, normalizer)
    state = state + jnp.einsum("bhkm,bhkd->bhmd", kc, vc)
    normalizer = normalizer + kc.sum(axis=2)
    return (state, normalizer), (num, den)

  init = (
    jnp.zeros((batch, heads, features, v.shape[-1]), _F32),
    jnp.zeros((batch, heads, features), _F32),
  )
  _, (num, den) = lax.scan(step, init, (qs, ks, vs))
  num = jnp.moveaxis(num, 0, 2).reshape(batch, heads, total, -1)[:, :, :q_len]
  den = jnp.moveaxis(den, 0, 2).reshape(batch, heads, total)[:, :, :q_len]
  return num, den


def linear_attention_from_features(
  phi_q: jax.Array,
  phi_k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  chunk_size: int = 64,
) -> jax.Array:
  """Normalized linear attention given query and key features; accumulates in float32.

  Args:
    phi_q: [batch, q_length, heads, num_features], non-negative.
    phi_k: [batch, kv_length, heads, num_features], non-negative.
    v: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; padded keys are excluded
      (their features zeroed); or None.
    causal: query i sees keys j <= i only (absolute positions).
    chunk_size: positions per chunk of the causal prefix sums; ignored when
      not causal.

  Returns:
    [batch, q_length, heads, head_dim] float32. Rows of padded queries
    (self-attention) and rows whose denominator is zero (no visible key) are
    zeros.

  Raises:
    ConfigError: chunk_size is not a positive integer.
  """
  check_positive_int("linear", "chunk_size", chunk_size)
  phi_q, phi_k, v = (x.astype(_F32) for x in (phi_q, phi_k, v))
  if mask is not None:
    phi_k = jnp.where(mask[:, :, None, None], phi_k, 0.0)
  # Heads-major ([B, H, L, ...]) once: every product below is then a plain batched
  # matrix product, with no transpose around each einsum, forward or backward.
  phi_q, phi_k, v = (x.transpose(0, 2, 1, 3) for x in (phi_q, phi_k, v))
  if causal:
    num, den = _causal_sums(phi_q, phi_k, v, chunk_size)
  else:
    num = jnp.einsum("bhqm,bhmd->bhqd", phi_q, jnp.einsum("bhkm,bhkd->bhmd", phi_k, v))
    den = jnp.einsum("bhqm,bhm->bhq", phi_q, phi_k.sum(axis=2))
  seen = den > 0
  # The inner where keeps the gradient finite on rows that see no key. Non-causal,
  # `normalize` takes the division's backward from the saved output: autodiff's reads the
  # numerator, and XLA recomputes phi(q) @ kv inside the backward's reduction for it (half
  # the step at 8K on CPU). Causal, the numerator is the scan's output, already stored.
  divide = (lambda a, b: a / b) if causal else normalize
  out = jnp.where(seen[..., None], divide(num, jnp.where(seen, den, 1.0)[..., None]), 0.0)
  return masking.zero_padded_queries(out.transpose(0, 2, 1, 3), mask)


def kernelized_attention_weights(
  phi_q: jax.Array,
  phi_k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
) -> jax.Array:
  """The map of `linear_attention_from_features`: phi(q) phi(k)^T, each row normalised.

  Quadratic by nature; for inspection at short lengths (`attention.maps`).

  Args:
    phi_q: [batch, q_length, heads, num_features], non-negative.
    phi_k: [batch, kv_length, heads, num_features], non-negative.
    mask: [batch, kv_length] bool, True = real token; or None.
    causal: query i sees keys j <= i only.

  Returns:
    [batch, heads, q_length, kv_length] float32: row i is phi(q_i) phi(k_j) over the
    visible real keys j divided by its sum; zero columns at padded (and, causal, later)
    keys, zero rows at padded queries (self-attention) and where no key has weight.
  """
  phi_q, phi_k = phi_q.astype(_F32), phi_k.astype(_F32)
  scores = jnp.einsum("bqhm,bkhm->bhqk", phi_q, phi_k)
  keep = masking.logits_bias(mask, q_length=phi_q.shape[1], kv_length=phi_k.shape[1], causal=causal)
  if keep is not None:
    scores = jnp.where(keep, scores, 0.0)
  den = scores.sum(axis=-1, keepdims=True)
  seen = den > 0
  weights = jnp.where(seen, scores / jnp.where(seen, den, 1.0), 0.0)
  if mask is not None and phi_q.shape[1] == phi_k.shape[1]:
    weights = jnp.where(mask[:, None, :, None], weights, 0.0)  # Padded query rows.
  return weights


def linear_attention_step(
  phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, state: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """One token of causal linear attention in its RNN form (Katharopoulos et al., eq. 16-20).

      S_i = S_{i-1} + phi(k_i) v_i^T,  z_i = z_{i-1} + phi(k_i),
      out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i)

  The state is O(1) in the sequence length; token by token this equals
  `linear_attention_from_features(..., causal=True)`.

  Args:
    phi_q, phi_k: [batch, heads, num_features] the token's query and key features.
    v: [batch, heads, head_dim].
    state: (S [batch, heads, num_features, head_dim], z [batch, heads, num_features])
      float32, zeros before the first token.

  Returns:
    (out [batch, heads, head_dim] float32 (zeros where no key has weight), new state).
  """
  phi_q, phi_k, v = (x.astype(_F32) for x in (phi_q, phi_k, v))
  kv, k_sum = state
  kv = kv + jnp.einsum("bhm,bhd->bhmd", phi_k, v)
  k_sum = k_sum + phi_k
  num = jnp.einsum("bhm,bhmd->bhd", phi_q, kv)
  den = jnp.einsum("bhm,bhm->bh", phi_q, k_sum)
  seen = den > 0
  out = jnp.where(seen[..., None], num / jnp.where(seen, den, 1.0)[..., None], 0.0)
  return out, (kv, k_sum)


class KernelizedAttention(MultiHeadAttention):
  """A linear attention over feature maps phi(q), phi(k): decodes token by token.

  Subclasses implement `feature_maps(q, k)` (the causal form's features) and
  `num_state_features`. `init_state(batch_size)` and `step(x_t, state)` run the
  RNN form (`linear_attention_step`) with O(1) state per layer, equal to the
  causal full pass token by token; RoPE rotates each token at its position,
  which the state counts.
  """

  supports_step = True

  @property
  def num_state_features(self) -> int:
    raise NotImplementedError

  def feature_maps(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """phi(q), phi(k) [batch, length, heads, num_features] of the causal form."""
    raise NotImplementedError

  def _check_step(self) -> None:
    if not self.causal:
      name = getattr(type(self), "registered_name", type(self).__name__)
      raise ConfigError(
        f"attention {name!r} decodes token by token only when causal=True.", argument="causal"
      )

  def init_state(self, batch_size: int) -> dict:
    """The empty state: sums S [batch, heads, m, head_dim], z [batch, heads, m], position 0."""
    self._check_step()
    shape = (batch_size, self.num_heads, self.num_state_features)
    return {
      "kv": jnp.zeros((*shape, self.head_dim), _F32),
      "k": jnp.zeros(shape, _F32),
      "position": jnp.zeros((), jnp.int32),
    }

  def step(self, x_t: jax.Array, state: dict) -> tuple[jax.Array, dict]:
    """One token: x_t [batch, in_features] -> (y_t [batch, in_features], new state).

    No dropout: `step` is for decoding, where the model is deterministic.
    """
    self._check_step()
    x = x_t[:, None]
    position = state["position"]
    q = self.rotate(self.query(x), offset=position)
    k = self.rotate(self.key(x), offset=position)
    v = self.value(x)
    phi_q, phi_k = self.feature_maps(q, k)
    out, (kv, k_sum) = linear_attention_step(
      phi_q[:, 0], phi_k[:, 0], v[:, 0], (state["kv"], state["k"])
    )
    y = self.out(out[:, None].astype(q.dtype))[:, 0]
    return y, {"kv": kv, "k": k_sum, "position": position + 1}


def elu_feature_map(x: jax.Array) -> jax.Array:
  """phi(x) = elu(x) + 1 > 0, in float32 (Katharopoulos et al., eq. 7)."""
  return jax.nn.elu(x.astype(_F32)) + 1.0


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  chunk_size: int = 64,
) -> jax.Array:
  """Linear attention with phi(x) = elu(x) + 1; no [L, L] array is formed.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; or None. Padded keys
      are excluded from the sums.
    causal: query i sees keys j <= i only.
    chunk_size: positions per chunk of the causal prefix sums (the peak extra
      memory holds one [batch, heads, chunk_size, chunk_size] block per chunk).

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype (accumulated in float32).
    Rows of padded queries and rows with no visible key are zeros.

  Raises:
    ConfigError: chunk_size is not a positive integer.
  """
  check_positive_int("linear", "chunk_size", chunk_size)
  masking.check_qkv("linear", q, k, v, mask)
  out = linear_attention_from_features(
    elu_feature_map(q), elu_feature_map(k), v, mask=mask, causal=causal, chunk_size=chunk_size
  )
  return out.astype(q.dtype)


@maps.register_weights("linear")
def linear_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  chunk_size: int = 64,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `linear_attention` (its arguments).

  phi(q) phi(k)^T with phi(x) = elu(x) + 1, each row divided by its sum over the visible
  real keys (`kernelized_attention_weights`). `chunk_size` only schedules the causal sums
  and does not change the map. Quadratic by nature; for inspection at short lengths
  (`attention.maps`).
  """
  maps.check_map_length("linear", q.shape[1], k.shape[1], max_length)
  check_positive_int("linear", "chunk_size", chunk_size)
  return kernelized_attention_weights(
    elu_feature_map(q), elu_feature_map(k), mask=mask, causal=causal
  )


_DEFAULTS = defaults_of(linear_attention)


@register("linear")
class LinearAttention(KernelizedAttention):
  """Multi-head linear attention (elu + 1 features), O(L) time and memory.

  Variant kwargs:
    chunk_size: positions per chunk of the causal prefix sums (default 64).
  """

  def __init__(
    self,
    *,
    chunk_size: int = _DEFAULTS.chunk_size,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    check_positive_int("linear", "chunk_size", chunk_size)
    super().__init__(**common)
    self.chunk_size = chunk_size

  @property
  def num_state_features(self) -> int:
    return self.head_dim

  def feature_maps(self, q, k):
    return elu_feature_map(q), elu_feature_map(k)

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return linear_attention(q, k, v, mask=mask, causal=self.causal, chunk_size=self.chunk_size)

  def map_params(self) -> dict:
    return {"chunk_size": self.chunk_size}
