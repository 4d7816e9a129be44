"""The attention matrix of every variant, for inspection: quadratic by nature.

    weights = maps.attention_weights("performer", q, k, mask=mask, features=w)
    out = maps.apply_weights(weights, v)   # == performer_attention(q, k, v, w, mask=mask)

`attention_weights(name, q, k, *, mask=None, causal=False, max_length=MAX_MAP_LENGTH,
**params)` returns [batch, heads, q_len, kv_len] float32: the matrix A whose product
with v is the variant's output (per head, before the output projection), up to float
error. What A is depends on the variant:

- exact attentions: the softmax probabilities;
- structured ones (local, sparse, Longformer, BigBird): the masked softmax under
  their pattern;
- linear and Performer: phi(q) phi(k)^T, each row normalised;
- Nystromformer: the product of its three factors (plus its depthwise convolution of
  v, a banded matrix);
- Reformer: the per-round LSH maps, combined by their logsumexp weights;
- Sinkhorn: the own-block and sorted-block map;
- Synthesizer: its synthesized weights;
- Linformer: its map through the length projections, softmax(q (E k)^T) F.

Every map is an [L, L] array, which the efficient variants exist to avoid: these
functions are for inspection at short lengths only. Above `max_length` positions
(MAX_MAP_LENGTH by default; pass a larger one to allow it) they raise a ConfigError.

Each variant's pure function `<variant>_attention_weights(q, k, *, mask, causal,
max_length, **params)` registers itself with `register_weights`; its module's
`attention_weights(x, *, mask)` (`MultiHeadAttention`) projects x and passes the
module's own parameters (random features, projections, hashes, ...).

Capture from any model, every attention layer, without touching its compiled path:

    with maps.capture() as layers:
      logits = model(inputs)                    # eagerly, or inside your own jit
    layers[i]["weights"]                        # [batch, heads, L, L] of the i-th call

Inside `capture`, each attention module's self-attention call also computes its map
(in call order, so layer order for a stack). The check is a Python one made while
the call is traced: a function traced outside `capture`, such as the train step,
contains no map at all.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from efficient_transformers.errors import ConfigError

# The longest q or kv length a map is built for unless the caller raises it.
MAX_MAP_LENGTH = 4096

_WEIGHTS: dict[str, Callable] = {}


def register_weights(name: str):
  """Decorator registering `fn` as attention `name`'s map function."""

  def wrap(fn):
    if name in _WEIGHTS and _WEIGHTS[name] is not fn:
      raise ValueError(f"attention {name!r} has two map functions")
    _WEIGHTS[name] = fn
    return fn

  return wrap


def available() -> list[str]:
  """The attentions with a map function, sorted."""
  return sorted(_WEIGHTS)


def check_map_length(name: str, q_length: int, kv_length: int, max_length: int) -> None:
  """A ConfigError unless both lengths are at most `max_length`."""
  if max(q_length, kv_length) > max_length:
    raise ConfigError(
      f"attention {name!r}: the attention map is [{q_length}, {kv_length}] per head, "
      f"quadratic by nature and for inspection at short lengths (max_length={max_length}); "
      "pass a larger max_length to build it anyway.",
      argument="max_length",
    )


def attention_weights(
  name: str,
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  max_length: int = MAX_MAP_LENGTH,
  **params,
) -> jax.Array:
  """The map [batch, heads, q_len, kv_len] of attention `name` (see the module docstring).

  Args:
    name: a registered attention.
    q: [batch, q_length, heads, head_dim].
    k: [batch, kv_length, heads, head_dim].
    mask: [batch, kv_length] bool, True = real token; or None.
    causal: query i sees keys j <= i only.
    max_length: the longest q or kv length to build a map for.
    **params: the variant's own kwargs and parameters, as its attention function
      takes them (block_size=..., features=..., ...).
  """
  if name not in _WEIGHTS:
    raise ConfigError(
      f"attention {name!r} has no attention map function; those that do: {', '.join(available())}.",
      argument="attention_name",
    )
  check_map_length(name, q.shape[1], k.shape[1], max_length)
  return _WEIGHTS[name](q, k, mask=mask, causal=causal, max_length=max_length, **params)


def apply_weights(weights: jax.Array, v: jax.Array) -> jax.Array:
  """weights [batch, heads, q_len, kv_len] @ v [batch, kv_len, heads, d] -> [batch, q_len,
  heads, d], float32."""
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(jnp.float32), v.astype(jnp.float32))


_CAPTURE = threading.local()


@contextlib.contextmanager
def capture(max_length: int = MAX_MAP_LENGTH) -> Iterator[list[dict]]:
  """Records the map of every attention self-attention call made inside the block.

  Yields a list that fills with one dict per call: {"attention": the variant's name,
  "module": the attention module, "inputs": its input x [batch, L, features], "mask": its
  mask, "weights": [batch, heads, L, L] float32}. Calls with a memory context or an
  additive bias are recorded with "weights": None (their map is not a self-attention map).
  A variant without a map function, or a length above `max_length`, raises.
  """
  records: list[dict] = []
  previous = getattr(_CAPTURE, "state", None)
  _CAPTURE.state = (records, max_length)
  try:
    yield records
  finally:
    _CAPTURE.state = previous


def record(module, x: jax.Array, mask: jax.Array | None, *, self_attention: bool) -> None:
  """Called by `MultiHeadAttention.__call__`: records module's map of x inside `capture`."""
  state = getattr(_CAPTURE, "state", None)
  if state is None:
    return
  records, max_length = state
  name = getattr(type(module), "registered_name", type(module).__name__)
  weights = (
    module.attention_weights(x, mask=mask, max_length=max_length) if self_attention else None
  )
  records.append(
    {"attention": name, "module": module, "inputs": x, "mask": mask, "weights": weights}
  )
