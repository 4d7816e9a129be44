"""The mixer registry: names -> `SequenceMixer` classes, and their factory.

    @registry.register("gru")
    class GRUMixer(SequenceMixer): ...

`make(name, in_features=..., num_heads=..., head_dim=..., causal=..., rngs=...,
**kwargs)` takes the same common arguments as `attention.make`; the remaining
keyword-only arguments of the class are the mixer's own, and an unknown one is
a ConfigError listing the valid ones.
"""

import inspect

from flax import nnx

from efficient_transformers.errors import ConfigError

_REGISTRY: dict[str, type] = {}
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
  """Class decorator adding a mixer class under `name`."""

  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"mixer {name!r} is registered twice")
    _REGISTRY[name] = cls
    cls.registered_name = name
    return cls

  return wrap


def available(*, causal: bool | None = None) -> list[str]:
  """The registered mixer names, sorted; `causal=True` keeps those that can be causal."""
  return sorted(n for n, c in _REGISTRY.items() if causal is None or c.supports_causal == causal)


def get_class(name: str) -> type:
  if name not in _REGISTRY:
    raise ConfigError(
      f"Unknown mixer {name!r}. Valid names: {', '.join(available())}.", argument="attention_name"
    )
  return _REGISTRY[name]


def mixer_kwargs(name: str) -> dict[str, inspect.Parameter]:
  """The keyword arguments specific to mixer `name` (beyond the common ones)."""
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
  """Builds mixer `name`; ConfigError for an unknown name, an impossible causal=True or an
  unknown keyword argument."""
  cls = get_class(name)
  if causal and not cls.supports_causal:
    raise ConfigError(
      f"mixer {name!r} cannot be causal (causal=True); causal mixers: "
      f"{', '.join(available(causal=True))}.",
      argument="attention_name",
    )
  allowed = mixer_kwargs(name)
  common = {k: kwargs.pop(k) for k in ("dtype", "param_dtype", "position") if k in kwargs}
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    valid = ", ".join(sorted(allowed)) or "none"
    raise ConfigError(
      f"mixer {name!r} got unknown keyword argument(s) {unknown}. Valid for {name!r}: {valid}.",
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
