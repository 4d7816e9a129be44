"""Helpers for config files: the `get_config(arg)` argument string and locking.

A config arg is a comma-separated list of flags and key=value pairs, e.g.
`smoke,attention=memory_efficient`. Each config file declares the names it
accepts; anything else is an error that lists them.
"""

from collections.abc import Mapping

import ml_collections

from efficient_transformers.errors import ConfigError


def parse_arg(arg: str | None, defaults: Mapping[str, object], *, config_file: str) -> dict:
  """Parses `arg` against `defaults` (name -> default value; bools are flags).

  Values are converted to the type of their default. Raises ConfigError naming
  the unknown name and the valid ones.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
        f"Unknown config arg {key!r} in {config_file}:{arg}. Valid: {', '.join(sorted(defaults))}."
      )
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"Config arg {key!r} in {config_file} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"Config arg {key}={value!r} in {config_file} must be true or false.")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, int):
      try:
        out[key] = int(value)
      except ValueError:
        raise ConfigError(f"Config arg {key}={value!r} in {config_file} must be an int.") from None
    elif isinstance(default, float):
      try:
        out[key] = float(value)
      except ValueError:
        raise ConfigError(f"Config arg {key}={value!r} in {config_file} must be a float.") from None
    else:
      out[key] = value
  return out


# Variant kwargs for the smoke configs' short sequences (~65 positions), where the
# paper-scale defaults (blocks of 64) would make every structured variant one
# dense block. The full configs keep each variant's own defaults.
SMOKE_ATTENTION_KWARGS = {
  "memory_efficient": dict(query_chunk_size=32, key_chunk_size=32),
  "local": dict(block_size=16),
  "sparse": dict(block_size=16),
  "longformer": dict(window=8),
  "bigbird": dict(block_size=8),
  "reformer": dict(chunk_size=16, num_buckets=8),
  "sinkhorn": dict(block_size=16),
  "nystromformer": dict(num_landmarks=16),
  "linformer": dict(k=16),
  "performer": dict(num_features=64),
}


def attention_defaults(
  name: str, *, smoke: bool = False, sequence_length: int | None = None
) -> ml_collections.ConfigDict:
  """The declared keyword arguments of attention `name` with their defaults.

  Putting them in the config makes every variant kwarg overridable from the
  command line (`--config.model.attention_kwargs.KEY=VALUE`) and recorded in
  the run's config.

  Args:
    name: a registered attention name.
    smoke: use SMOKE_ATTENTION_KWARGS for the variant's block sizes.
    sequence_length: the positions the encoder attends over (tokens plus a CLS
      token); sets the `max_length` of variants with learned length-sized
      parameters (Linformer, Sinkhorn, Synthesizer).
  """
  from efficient_transformers import attention  # Registers every variant.

  declared = attention.registry.variant_kwargs(name)
  kwargs = {}
  for key, param in declared.items():
    if key in ("dtype", "param_dtype"):
      continue  # Set from config.model.dtype.
    if param.default is param.empty:
      raise ConfigError(f"attention {name!r} requires keyword {key!r}; set it in the config.")
    kwargs[key] = param.default
  if smoke:
    kwargs.update(SMOKE_ATTENTION_KWARGS.get(name, {}))
  if sequence_length is not None and "max_length" in declared:
    kwargs["max_length"] = sequence_length
  # Allow None-valued defaults to be overridden by a value of another type.
  return ml_collections.ConfigDict(kwargs, type_safe=False)


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config: setting a key it does not have is an error."""
  config.lock()
  return config
