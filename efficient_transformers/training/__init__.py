"""The training system: config helpers, loop, optimizers, sharding, checkpoints, metrics."""

from efficient_transformers.training.train_lib import NonFiniteLossError, train_and_evaluate

__all__ = ["NonFiniteLossError", "train_and_evaluate"]
