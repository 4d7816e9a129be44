"""Checks of variant keyword arguments, with messages naming the variant and the parameter.

Variants call these in `__init__` (so a bad value fails when the model is
built) and in their pure functions (for direct callers). The errors name the
argument as a model takes it, `attention_kwargs.NAME` (see `ConfigError`).
"""

from efficient_transformers.errors import ConfigError


def check_positive_int(variant: str, name: str, value, *, minimum: int = 1) -> None:
  """Raises ConfigError unless `value` is an int >= `minimum` (bools are not ints here)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ConfigError(
      f"attention {variant!r}: {name}={value!r} must be {kind}.",
      argument=f"attention_kwargs.{name}",
    )


def check_fits_sequence(variant: str, name: str, value: int, length: int) -> None:
  """Raises ConfigError when a block (window) of `value` tokens exceeds the sequence."""
  if value > length:
    raise ConfigError(
      f"attention {variant!r}: {name}={value} is larger than the sequence length {length}; "
      f"set {name} <= {length}.",
      argument=f"attention_kwargs.{name}",
    )


def check_not_causal(variant: str, causal: bool, why: str) -> None:
  """Raises ConfigError for causal=True in a variant that cannot be causal (`why`)."""
  if causal:
    raise ConfigError(
      f"attention {variant!r}: causal=True is not supported ({why}); use a causal variant.",
      argument="attention_name",
    )
