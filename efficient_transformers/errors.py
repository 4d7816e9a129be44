"""Errors a user can cause and fix: a config, a data file, a checkpoint or a flag.

Command lines catch `UserError` and print its message alone, without a stack
trace, so every message must name the thing to fix.
"""


class UserError(Exception):
  """Base class of errors caused by user input."""


class ConfigError(UserError, ValueError):
  """A config key, config value or flag is invalid.

  Library code (attention, memory, models, layers) knows its arguments, not the
  config that set them, so it passes `argument`: the dotted name of the argument
  at fault as a model's constructor takes it ("num_heads", "positional",
  "attention_kwargs.kernel"). The message then ends with "(argument: NAME)".
  The training layer, which builds models from config.model, re-raises such an
  error naming the config key instead (`training.state.build_model`).

  Attributes:
    message: the message without the argument.
    argument: the constructor argument at fault, or None.
  """

  def __init__(self, message: str, *, argument: str | None = None):
    super().__init__(message if argument is None else f"{message} (argument: {argument})")
    self.message = message
    self.argument = argument

  def __reduce__(self):
    # Exceptions pickle their args; the keyword would be lost (or the suffix doubled).
    return _config_error, (self.message, self.argument)


def _config_error(message: str, argument: str | None) -> ConfigError:
  return ConfigError(message, argument=argument)


class DataError(UserError, ValueError):
  """A data file or data directory is missing or malformed."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint is missing, damaged or belongs to another model."""
