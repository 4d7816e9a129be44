"""Synthesizer: attention weights synthesized without query-key dot products.

Tay, Bahri, Metzler, Juan, Zhao, Zheng, "Synthesizer: Rethinking Self-Attention
in Transformer Models" (ICML 2021). Instead of softmax(q k^T / sqrt(d)), each
head's [L, L] logits are produced by one of four forms (`synthesizer=`):

- "dense": row i is a function of token i alone,
  B_i = W2 relu(W1 x_i + b1) + b2, with W2: head_dim -> max_length, the first
  L outputs used as the logits over the L keys. The first layer (W1, b1) IS the
  per-head query projection of `MultiHeadAttention`, so `attend(q, k, v)` keeps
  its signature: B = relu(q) @ W2[h] + b2[h].
- "random": a [heads, max_length, max_length] logits table R, sliced to
  [L, L]; input independent. Learned (`trainable_random=True`, an `nnx.Param`)
  or fixed at its random initialization (a non-Param `FixedSynthesizerLogits`
  variable, which optimizers built with `wrt=nnx.Param` leave alone).
- "factorized_dense": two small dense heads per query, A_i (size a = `factor`)
  and B_i (size b = ceil(max_length / a)), both computed from relu(q) like the
  dense form, combined as logits[i, j] = A_i[j mod a] * B_i[j // a], i.e.
  tile(A_i) (A_i repeated b times) times repeat(B_i) (each entry repeated a
  times), the paper's H_A(A) * H_B(B), cut to L keys. This is the flattened
  outer product B_i (x) A_i: every key position gets a distinct pair of factors.
- "factorized_random": R = R1 R2^T with R1, R2 [heads, max_length, rank].

With `mix_dot_product=True` the logits are the paper's mixture
a1 * synthesized + a2 * q k^T / sqrt(d), with learned per-head scalars a1, a2
(both initialized to 0.5) and one softmax over the sum.

Padding and causality: padded keys get a large negative logit
(masking.large_negative) before the (float32) softmax; padded query rows are
zero; `causal=True` applies the lower-triangular mask (the paper's decoder
Synthesizer). Rows with no visible key are zero, not NaN.

Projections that a form leaves unused: without the mixture the key projection
is computed but ignored (its gradient is zero); the random forms also ignore
the query projection. Both are kept so every attention variant has the same
parameter tree (checkpoints, sharding rules and the Linen bridge stay uniform).

Cost per head: O(L^2 d) time and O(L^2) memory (dense and random forms build
the [L, L] logits by definition, as does exact attention; the mixture keeps
both [L, L] logits for the backward pass, about twice softmax's temporary
memory). Parameters per head
beyond the projections: O(d L) dense (W2: d x max_length), O(L^2) random,
O(d (a + b)) factorized dense (smallest at a ~ sqrt(max_length)), O(L rank)
factorized random. A length above `max_length` is a ConfigError.

Relative to the original LRA code (lra_benchmarks/models/synthesizer): in its
synthesizer-only mode (the default, no dot product) it applies neither the
padding nor the segmentation mask, so padded tokens receive attention; here
padded keys are always masked and padded query rows zeroed. Its dense form
shares one W2 across heads and turns [batch, L, heads, max_length] into
[batch, heads, L, max_length] with a reshape rather than a transpose, which
mixes positions and heads; here W2 is per head and row i of head h is token
i's (the hand-computed logits test pins this). It has no factorized dense
form, and mixes by adding the logits with weight 1 each, without learned
per-head weights.

`synthesizer_attention_weights` returns the softmax weights themselves (the
map, [L, L] like the logits), for inspection at short lengths (`attention.maps`).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.attention import maps, masking
from efficient_transformers.attention.base import MultiHeadAttention
from efficient_transformers.attention.registry import register
from efficient_transformers.attention.validation import check_positive_int
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers.partitioning import param_axes

_F32 = jnp.float32
FORMS = ("dense", "random", "factorized_dense", "factorized_random")


class FixedSynthesizerLogits(nnx.Variable):
  """A random synthesizer's fixed table (R, or its factors R1, R2): state, not a parameter.

  Optimizers built with `wrt=nnx.Param` leave it alone; the training system
  rebuilds it from the model seed, so a resumed run gets the same table.
  """


def _check_length(length: int, max_length: int) -> None:
  if length > max_length:
    raise ConfigError(
      f"attention 'synthesizer': input length {length} exceeds max_length={max_length}; "
      "raise it to at least the sequence length.",
      argument="attention_kwargs.max_length",
    )


def _check_params(synthesizer, max_length, factor, rank, trainable_random, mix_dot_product):
  if synthesizer not in FORMS:
    raise ConfigError(
      f"attention 'synthesizer': synthesizer={synthesizer!r} is not a known form; valid: "
      f"{', '.join(FORMS)}.",
      argument="attention_kwargs.synthesizer",
    )
  check_positive_int("synthesizer", "max_length", max_length)
  check_positive_int("synthesizer", "factor", factor)
  check_positive_int("synthesizer", "rank", rank)
  for name, value in (("trainable_random", trainable_random), ("mix_dot_product", mix_dot_product)):
    if not isinstance(value, bool):
      raise ConfigError(
        f"attention 'synthesizer': {name}={value!r} must be True or False.",
        argument=f"attention_kwargs.{name}",
      )


def dense_synthesizer_logits(q: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """Dense synthesizer logits relu(q) @ W2[h] + b2[h], cut to the sequence's L keys.

  Args:
    q: [batch, length, heads, head_dim], the first layer's output W1 x + b1.
    kernel: W2, [heads, head_dim, max_length].
    bias: b2, [heads, max_length].

  Returns:
    [batch, heads, length, length] float32 logits; row i depends on token i only.

  Raises:
    ConfigError: length > max_length.
  """
  length = q.shape[1]
  _check_length(length, kernel.shape[-1])
  hidden = jax.nn.relu(q.astype(_F32))
  logits = jnp.einsum("blhd,hdk->bhlk", hidden, kernel[..., :length].astype(_F32))
  return logits + bias[None, :, None, :length].astype(_F32)


def factorized_dense_synthesizer_logits(
  q: jax.Array,
  kernel_a: jax.Array,
  bias_a: jax.Array,
  kernel_b: jax.Array,
  bias_b: jax.Array,
) -> jax.Array:
  """Factorized dense logits: logits[i, j] = A_i[j mod a] * B_i[j // a].

  A_i = relu(q_i) @ WA[h] + bA[h] (size a), B_i = relu(q_i) @ WB[h] + bB[h]
  (size b); the a * b products cover up to a * b key positions.

  Args:
    q: [batch, length, heads, head_dim].
    kernel_a, bias_a: [heads, head_dim, a], [heads, a].
    kernel_b, bias_b: [heads, head_dim, b], [heads, b].

  Returns:
    [batch, heads, length, length] float32 logits.

  Raises:
    ConfigError: length > a * b (the module's max_length).
  """
  length = q.shape[1]
  a, b = kernel_a.shape[-1], kernel_b.shape[-1]
  _check_length(length, a * b)
  used_b = -(-length // a)  # Only the B entries that reach key positions < length.
  hidden = jax.nn.relu(q.astype(_F32))
  fa = jnp.einsum("nlhd,hda->nhla", hidden, kernel_a.astype(_F32))
  fa = fa + bias_a[None, :, None, :].astype(_F32)
  fb = jnp.einsum("nlhd,hdc->nhlc", hidden, kernel_b[..., :used_b].astype(_F32))
  fb = fb + bias_b[None, :, None, :used_b].astype(_F32)
  # [.., used_b, a] flattened: key j = jb * a + ja gets B[jb] * A[ja].
  logits = (fb[..., :, None] * fa[..., None, :]).reshape(*fa.shape[:3], used_b * a)
  return logits[..., :length]


def random_synthesizer_logits(table: jax.Array, length: int) -> jax.Array:
  """The random synthesizer's logits: R [heads, max_length, max_length] cut to [1, heads, L, L].

  Raises:
    ConfigError: length > max_length.
  """
  _check_length(length, table.shape[-1])
  return table[None, :, :length, :length].astype(_F32)


def factorized_random_synthesizer_logits(
  factor_1: jax.Array, factor_2: jax.Array, length: int
) -> jax.Array:
  """Factorized random logits R1 R2^T from R1, R2 [heads, max_length, rank]: [1, heads, L, L].

  Raises:
    ConfigError: length > max_length.
  """
  _check_length(length, factor_1.shape[-2])
  r1, r2 = (f[:, :length].astype(_F32) for f in (factor_1, factor_2))
  return jnp.einsum("hlr,hmr->hlm", r1, r2)[None]


def _synthesizer_softmax(
  synth_logits: jax.Array,
  batch: int,
  *,
  q: jax.Array | None,
  k: jax.Array | None,
  mask: jax.Array | None,
  causal: bool,
  mix_weights: tuple[jax.Array, jax.Array] | None,
) -> jax.Array:
  """The softmax weights [batch, heads, q_len, kv_len] float32 of (checked) arguments of
  `synthesizer_attention`: masked keys get zero, rows with no visible key are zero."""
  heads, q_length, kv_length = synth_logits.shape[1:]
  logits = jnp.broadcast_to(synth_logits.astype(_F32), (batch, heads, q_length, kv_length))
  if mix_weights is not None:
    a1, a2 = (jnp.broadcast_to(jnp.asarray(w, _F32), (heads,)) for w in mix_weights)
    dot = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32)
    dot = dot * (q.shape[-1] ** -0.5)
    logits = a1[None, :, None, None] * logits + a2[None, :, None, None] * dot
  keep = masking.logits_bias(mask, q_length=q_length, kv_length=kv_length, causal=causal)
  if keep is not None:
    logits = jnp.where(keep, logits, masking.large_negative(_F32))
  weights = jax.nn.softmax(logits, axis=-1)
  if keep is not None:
    # A row with no visible key would average all values uniformly; make it 0.
    weights = jnp.where(keep.any(axis=-1, keepdims=True), weights, 0.0)
  return weights


def synthesizer_attention(
  synth_logits: jax.Array,
  v: jax.Array,
  *,
  q: jax.Array | None = None,
  k: jax.Array | None = None,
  mask: jax.Array | None = None,
  causal: bool = False,
  mix_weights: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """softmax(logits) v over allowed keys, for already-synthesized logits.

  Args:
    synth_logits: [batch or 1, heads, q_length, kv_length] synthesized logits
      (from one of the `*_synthesizer_logits` functions).
    v: [batch, kv_length, heads, head_dim].
    q, k: [batch, q_length / kv_length, heads, head_dim]; used (and required)
      only with `mix_weights`.
    mask: [batch, kv_length] bool, True = real token; or None.
    causal: query i sees keys j <= i only.
    mix_weights: (a1, a2), each a scalar or [heads]: logits become
      a1 * synth_logits + a2 * q k^T / sqrt(head_dim) (the paper's mixture with
      dot-product attention). None: synth_logits alone (q, k ignored).

  Returns:
    [batch, q_length, heads, head_dim] in q's dtype (v's without q); softmax
    in float32. Padded query rows (q_length == kv_length) and rows with no
    visible key are zeros.
  """
  if v.ndim != 4:
    raise ValueError(f"synthesizer: v must be [batch, length, heads, head_dim]; got {v.shape}.")
  batch, kv_length, heads, _ = v.shape
  if (
    synth_logits.ndim != 4
    or synth_logits.shape[0] not in (1, batch)
    or synth_logits.shape[1] != heads
    or synth_logits.shape[3] != kv_length
  ):
    raise ValueError(
      f"synthesizer: synth_logits must be [batch or 1, {heads}, q_length, {kv_length}] for v "
      f"{v.shape}; got {synth_logits.shape}."
    )
  if mask is not None and mask.shape != (batch, kv_length):
    raise ValueError(f"synthesizer: mask must be [batch, kv_length] = {(batch, kv_length)}.")
  q_length = synth_logits.shape[2]
  if mix_weights is not None:
    if q is None or k is None:
      raise ValueError("synthesizer: mixing with dot-product attention needs q and k.")
    masking.check_qkv("synthesizer", q, k, v, mask)
    if q.shape[1] != q_length:
      raise ValueError(f"synthesizer: q length {q.shape[1]} != synth_logits rows {q_length}.")
  weights = _synthesizer_softmax(
    synth_logits, batch, q=q, k=k, mask=mask, causal=causal, mix_weights=mix_weights
  )
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
  out_dtype = v.dtype if q is None else q.dtype
  return masking.zero_padded_queries(out, mask).astype(out_dtype)


@maps.register_weights("synthesizer")
def synthesizer_attention_weights(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = maps.MAX_MAP_LENGTH,
  synth_logits: jax.Array,
  mix_weights: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] float32 of `synthesizer_attention` (its arguments).

  The softmax of the synthesized logits (any form's, from its `*_synthesizer_logits`
  function), mixed with the dot-product logits q k^T / sqrt(d) where `mix_weights` is
  given. q and k are used only by the mixture. Rows of real queries sum to 1; padded
  (and, causal, later) keys get zero weight; padded query rows (q_len == kv_len) are
  zero. Quadratic by nature; for inspection at short lengths (`attention.maps`).
  """
  maps.check_map_length("synthesizer", q.shape[1], k.shape[1], max_length)
  batch, q_length, heads = q.shape[:3]
  kv_length = k.shape[1]
  if (
    synth_logits.ndim != 4
    or synth_logits.shape[0] not in (1, batch)
    or synth_logits.shape[1:] != (heads, q_length, kv_length)
  ):
    raise ValueError(
      f"synthesizer: synth_logits must be [batch or 1, {heads}, {q_length}, {kv_length}] for "
      f"q {q.shape} and k {k.shape}; got {synth_logits.shape}."
    )
  if mask is not None and mask.shape != (batch, kv_length):
    raise ValueError(f"synthesizer: mask must be [batch, kv_length] = {(batch, kv_length)}.")
  weights = _synthesizer_softmax(
    synth_logits, batch, q=q, k=k, mask=mask, causal=causal, mix_weights=mix_weights
  )
  if mask is not None and q_length == kv_length:
    weights = jnp.where(mask[:, None, :, None], weights, 0.0)  # Padded query rows.
  return weights


@register("synthesizer")
class SynthesizerAttention(MultiHeadAttention):
  """Multi-head Synthesizer attention (see the module docstring for the forms).

  Variant kwargs:
    synthesizer: "dense" (default), "random", "factorized_dense" or
      "factorized_random".
    max_length: longest input (default 512); longer is a ConfigError.
    factor: a, the size of the first factorized-dense head (default 8); the
      second has b = ceil(max_length / a).
    rank: rank of the factorized random logits (default 8).
    trainable_random: learn the random forms' table/factors (default True) or
      keep them fixed at initialization (non-Param variables).
    mix_dot_product: add dot-product logits, a1 * synth + a2 * q k^T / sqrt(d),
      with learned per-head a1, a2 initialized to 0.5 (default False).

  Parameters (per form): dense `synth_kernel` [heads, head_dim, max_length],
  `synth_bias` [heads, max_length]; random `random_logits` [heads, max_length,
  max_length]; factorized dense `synth_kernel_a/b`, `synth_bias_a/b`
  ([heads, head_dim, a or b], [heads, a or b]); factorized random
  `random_factor_1/2` [heads, max_length, rank]; with the mixture,
  `mix_synthesized` and `mix_dot` [heads].
  """

  supports_rope = False  # Its logits are synthesized, not q . k (RoPE would act on mix_dot only).

  def __init__(
    self,
    *,
    synthesizer: str = "dense",
    max_length: int = 512,
    factor: int = 8,
    rank: int = 8,
    trainable_random: bool = True,
    mix_dot_product: bool = False,
    **common,
  ):
    # Fail when the model is built, not at the first traced step.
    _check_params(synthesizer, max_length, factor, rank, trainable_random, mix_dot_product)
    super().__init__(**common)
    self.synthesizer = synthesizer
    self.max_length = max_length
    self.factor = factor
    self.rank = rank
    self.trainable_random = trainable_random
    self.mix_dot_product = mix_dot_product
    rngs, heads, head_dim = common["rngs"], self.num_heads, self.head_dim
    param_dtype = common.get("param_dtype", jnp.float32)
    # Per-head fan-in = head_dim, so logits start at O(1) like q k^T / sqrt(d).
    kernel_init = nnx.initializers.lecun_normal(batch_axis=(0,))

    def param(init, shape, *axes):
      return nnx.Param(init(rngs.params(), shape, param_dtype), **param_axes(*axes))

    def table(init, shape):
      variable = nnx.Param if trainable_random else FixedSynthesizerLogits
      value = init(rngs.params(), shape, param_dtype)
      return variable(value, **param_axes("heads", *[None] * (len(shape) - 1)))

    zeros = nnx.initializers.zeros
    if synthesizer == "dense":
      self.synth_kernel = param(kernel_init, (heads, head_dim, max_length), "heads", "kv", None)
      self.synth_bias = param(zeros, (heads, max_length), "heads", None)
    elif synthesizer == "factorized_dense":
      a, b = factor, math.ceil(max_length / factor)
      self.synth_kernel_a = param(kernel_init, (heads, head_dim, a), "heads", "kv", None)
      self.synth_bias_a = param(zeros, (heads, a), "heads", None)
      self.synth_kernel_b = param(kernel_init, (heads, head_dim, b), "heads", "kv", None)
      self.synth_bias_b = param(zeros, (heads, b), "heads", None)
    elif synthesizer == "random":
      self.random_logits = table(nnx.initializers.normal(1.0), (heads, max_length, max_length))
    else:
      # Entries of R1 R2^T then have unit variance, like the plain random table.
      init = nnx.initializers.normal(rank**-0.25)
      self.random_factor_1 = table(init, (heads, max_length, rank))
      self.random_factor_2 = table(init, (heads, max_length, rank))
    if mix_dot_product:
      half = nnx.initializers.constant(0.5)
      self.mix_synthesized = param(half, (heads,), "heads")
      self.mix_dot = param(half, (heads,), "heads")

  def synthesized_logits(self, q: jax.Array) -> jax.Array:
    """The form's logits [batch or 1, heads, L, L] for queries q [batch, L, heads, head_dim].

    Raises:
      ConfigError: L > max_length.
    """
    length = q.shape[1]
    _check_length(length, self.max_length)
    if self.synthesizer == "dense":
      return dense_synthesizer_logits(q, self.synth_kernel[...], self.synth_bias[...])
    if self.synthesizer == "factorized_dense":
      return factorized_dense_synthesizer_logits(
        q,
        self.synth_kernel_a[...],
        self.synth_bias_a[...],
        self.synth_kernel_b[...],
        self.synth_bias_b[...],
      )
    if self.synthesizer == "random":
      return random_synthesizer_logits(self.random_logits[...], length)
    return factorized_random_synthesizer_logits(
      self.random_factor_1[...], self.random_factor_2[...], length
    )

  def mix_weights(self) -> tuple[jax.Array, jax.Array] | None:
    """The mixture's per-head (a1, a2) with mix_dot_product, else None."""
    return (self.mix_synthesized[...], self.mix_dot[...]) if self.mix_dot_product else None

  def attend(self, q, k, v, *, mask, deterministic):
    del deterministic
    return synthesizer_attention(
      self.synthesized_logits(q),
      v,
      q=q,
      k=k,
      mask=mask,
      causal=self.causal,
      mix_weights=self.mix_weights(),
    )

  def map_params(self) -> dict:
    return {"mix_weights": self.mix_weights()}

  def attention_weights(
    self, x: jax.Array, *, mask: jax.Array | None = None, max_length: int = maps.MAX_MAP_LENGTH
  ) -> jax.Array:
    """The map [batch, heads, L, L] of self-attention over x (`MultiHeadAttention`'s).

    The dense forms' logits depend on x through the queries, so they are synthesized
    here, from the same q the call uses, rather than by `map_params`.
    """
    maps.check_map_length("synthesizer", x.shape[1], x.shape[1], max_length)
    q, k = self.rotate(self.query(x)), self.rotate(self.key(x))
    return maps.attention_weights(
      "synthesizer",
      q,
      k,
      mask=mask,
      causal=self.causal,
      max_length=max_length,
      synth_logits=self.synthesized_logits(q),
      **self.map_params(),
    )
