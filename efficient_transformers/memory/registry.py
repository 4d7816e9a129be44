"""The memory registry: names -> memory options of the one stack, and the one factory.

A memory option is an `nnx.Module` (its own parameters: compressors, a learned
initial memory) that runs a `models.Stack`'s blocks over one segment:

    option.init_memory(batch_size, **lengths) -> state (a pytree)
    option.run(stack, x, state, *, mask, reset, deterministic) -> (y, state, aux)

It feeds each block a context (`Block(x, context=..., context_mask=...)`) or an
additive bias, so it works with every attention that takes what it feeds;
`check_attention` says which before anything is built. Options register
themselves:

    @registry.register("transformer_xl")
    class TransformerXLMemory(nnx.Module): ...
"""

import inspect

from efficient_transformers.errors import ConfigError

_REGISTRY: dict[str, type] = {}


def register(name: str):
  """Class decorator adding a memory option under `name`."""

  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"memory {name!r} is registered twice")
    _REGISTRY[name] = cls
    cls.registered_name = name
    return cls

  return wrap


def available() -> list[str]:
  """The registered memory names, sorted (the stack also takes "none")."""
  return sorted(_REGISTRY)


def get_class(name: str) -> type:
  if name not in _REGISTRY:
    raise ConfigError(
      f"Unknown memory {name!r}. Valid names: none, {', '.join(available())}.", argument="memory"
    )
  return _REGISTRY[name]


def option_kwargs(name: str) -> dict[str, inspect.Parameter]:
  """The keyword arguments the option takes beyond the stack's sizes."""
  params = dict(inspect.signature(get_class(name).__init__).parameters)
  common = ("self", "num_layers", "features", "rngs", "dtype", "param_dtype")
  return {k: p for k, p in params.items() if k not in common and p.kind == p.KEYWORD_ONLY}


def make(name: str, **kwargs):
  """Builds memory `name`; unknown keyword arguments are a ConfigError listing the valid ones."""
  cls = get_class(name)
  allowed = option_kwargs(name)
  common = ("num_layers", "features", "rngs", "dtype", "param_dtype")
  unknown = sorted(set(kwargs) - set(allowed) - set(common))
  if unknown:
    raise ConfigError(
      f"memory {name!r} got unknown arguments {unknown}; it takes: "
      f"{', '.join(sorted(allowed)) or 'none'}.",
      argument=f"memory_kwargs.{unknown[0]}",
    )
  return cls(**kwargs)


def check_attention(name: str, attention_name: str, attention_kwargs: dict | None, *, causal):
  """Raises ConfigError unless memory `name` can feed attention `attention_name`."""
  get_class(name).check_attention(attention_name, dict(attention_kwargs or {}), causal=causal)
