"""The training system: config helpers, loop, optimizers, sharding, checkpoints, metrics."""

__all__ = ["NonFiniteLossError", "train_and_evaluate"]


def __getattr__(name: str):
  # Lazily: the command lines import `training.cli` first, and a bad flag or the
  # supervisor of a multi-process run should not wait for JAX and Flax to load.
  if name in __all__:
    from efficient_transformers.training import train_lib

    return getattr(train_lib, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
