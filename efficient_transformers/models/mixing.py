"""Every sequence mixer a block can hold, by name: the attention variants and the baselines.

A block's mixer is named like an attention (`config.model.attention=NAME`):
one of `attention.available()` (softmax, local, performer, ...) or of
`mixers.available()` (lstm, gru, conv, s4d, lru, s5). Both registries take the
same common arguments and the same call (`module(x, *, mask, deterministic)`),
so this module only looks a name up in the right one.
"""

import inspect

from flax import nnx

from efficient_transformers import attention, mixers
from efficient_transformers.errors import ConfigError


def available(*, causal: bool | None = None) -> list[str]:
  """Every mixer name (attentions first, then the baselines); `causal=True` keeps those that
  can be causal."""
  return [*attention.available(causal=causal), *mixers.available(causal=causal)]


def is_attention(name: str) -> bool:
  """Whether `name` is an attention variant (and not a baseline mixer)."""
  return name in attention.available()


def get_class(name: str) -> type:
  """The module class of mixer `name`; a ConfigError listing every valid name."""
  if name in mixers.available():
    return mixers.get_class(name)
  if name in attention.available():
    return attention.get_class(name)
  raise ConfigError(
    f"Unknown attention or mixer {name!r}. Attentions: {', '.join(attention.available())}; "
    f"mixers: {', '.join(mixers.available())}.",
    argument="attention_name",
  )


def variant_kwargs(name: str) -> dict[str, inspect.Parameter]:
  """The keyword arguments specific to mixer `name` (beyond the common ones)."""
  get_class(name)  # An unknown name is named first.
  if is_attention(name):
    return attention.registry.variant_kwargs(name)
  return mixers.registry.mixer_kwargs(name)


def make(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
  """Builds mixer `name` with `attention.make`'s arguments (`mixers.make` for a baseline)."""
  get_class(name)
  build = attention.make if is_attention(name) else mixers.make
  return build(name, rngs=rngs, **kwargs)
