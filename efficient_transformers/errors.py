"""Errors a user can cause and fix: a config, a data file, a checkpoint or a flag.

Command lines catch `UserError` and print its message alone, without a stack
trace, so every message must name the thing to fix.
"""


class UserError(Exception):
  """Base class of errors caused by user input."""


class ConfigError(UserError, ValueError):
  """A config key, config value or flag is invalid."""


class DataError(UserError, ValueError):
  """A data file or data directory is missing or malformed."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint is missing, damaged or belongs to another model."""
