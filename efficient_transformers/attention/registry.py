"""The attention registry: names -> module classes, and the one factory.

Variants register themselves by decorating their module class:

    @registry.register("softmax")
    class SoftmaxAttention(MultiHeadAttention): ...

Configs select a variant by name (`config.model.attention`) with keyword
arguments in `config.model.attention_kwargs`; `make` validates both against
the registered class so a typo becomes an error naming the valid choices.
"""

import inspect

from flax import nnx

from efficient_transformers.errors import ConfigError

_REGISTRY: dict[str, type] = {}

# Arguments every variant takes (MultiHeadAttention's); the rest are variant kwargs.
# A variant declares only its own, keyword-only, and forwards the rest:
#     def __init__(self, *, block_size: int = 64, **common):
#       super().__init__(**common)
_COMMON = (
  "in_features",
  "num_heads",
  "head_dim",
  "dropout_rate",
  "causal",
  "position",
  "rngs",
  "dtype",
  "param_dtype",
)


def register(name: str):
  """Class decorator adding an attention module class under `name`."""

  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"attention {name!r} is registered twice")
    _REGISTRY[name] = cls
    cls.registered_name = name
    return cls

  return wrap


def available(*, causal: bool | None = None) -> list[str]:
  """The registered attention names, sorted; `causal=True` keeps those that can be causal."""
  return sorted(n for n, c in _REGISTRY.items() if causal is None or c.supports_causal == causal)


def get_class(name: str) -> type:
  if name not in _REGISTRY:
    raise ConfigError(
      f"Unknown attention {name!r}. Valid names: {', '.join(available())}.",
      argument="attention_name",
    )
  return _REGISTRY[name]


def variant_kwargs(name: str) -> dict[str, inspect.Parameter]:
  """The keyword arguments specific to variant `name` (beyond the common ones)."""
  sig = inspect.signature(get_class(name).__init__)
  return {
    k: p
    for k, p in sig.parameters.items()
    if k != "self" and k not in _COMMON and p.kind is p.KEYWORD_ONLY
  }


def make(
  name: str,
  *,
  in_features: int,
  num_heads: int,
  head_dim: int,
  dropout_rate: float = 0.0,
  causal: bool = False,
  rngs: nnx.Rngs,
  **kwargs,
) -> nnx.Module:
  """Builds attention variant `name`.

  Returns a module called as `module(x, *, mask=None, deterministic=True) -> y`
  with `y.shape == x.shape`.

  Raises:
    ConfigError: for an unknown name (listing the valid ones), causal=True
      for a variant that cannot be causal (listing those that can), or a
      keyword argument the variant does not take (listing the ones it does).
  """
  cls = get_class(name)
  if causal and not cls.supports_causal:
    raise ConfigError(
      f"attention {name!r} cannot be causal (causal=True: {cls.why_not_causal}); causal variants: "
      f"{', '.join(available(causal=True))}.",
      argument="attention_name",
    )
  allowed = variant_kwargs(name)
  common = {k: kwargs.pop(k) for k in ("dtype", "param_dtype", "position") if k in kwargs}
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    valid = ", ".join(sorted(allowed)) or "none"
    raise ConfigError(
      f"attention {name!r} got unknown keyword argument(s) {unknown}. Valid for {name!r}: {valid}.",
      argument=f"attention_kwargs.{unknown[0]}",
    )
  return cls(
    in_features=in_features,
    num_heads=num_heads,
    head_dim=head_dim,
    dropout_rate=dropout_rate,
    causal=causal,
    rngs=rngs,
    **common,
    **kwargs,
  )
