"""Evaluation over a whole split, and what identifies a model for checkpoints."""

import math
from collections.abc import Callable, Iterable

import jax
import ml_collections
import numpy as np

from efficient_transformers.training import sharding


def evaluate(
  compiled_eval_step: Callable,
  params: dict,
  batches: Iterable[dict[str, np.ndarray]],
  batch_sharding,
  *,
  max_batches: int = -1,
) -> dict[str, float]:
  """Weighted loss and accuracy over `batches` (padding examples carry weight 0).

  Every process iterates the same number of batches (the pipeline pads), so
  the SPMD eval step never waits on a process that ran out of data.
  """
  totals = None
  for i, local in enumerate(batches):
    if 0 <= max_batches <= i:
      break
    sums = compiled_eval_step(params, sharding.global_batch(local, batch_sharding))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    return {"loss": float("nan"), "accuracy": float("nan"), "num_examples": 0.0}
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {
    "loss": float(totals["loss_sum"]) / count,
    "accuracy": float(totals["correct_sum"]) / count,
    "num_examples": float(totals["count"]),
  }


def evaluate_stream(
  compiled_eval_step: Callable,
  params: dict,
  memory: dict,
  batches: Iterable[dict[str, np.ndarray]],
  batch_sharding,
  *,
  max_batches: int = -1,
) -> dict[str, float]:
  """Next-token loss over an ordered stream, the memory carried from batch to batch.

  `memory` is the empty memory to start from (its length may exceed the
  training one); it is consumed. Returns loss (nats per token), accuracy,
  bits_per_byte (= loss / ln 2: one token is one byte) and num_tokens.
  """
  totals = None
  for i, local in enumerate(batches):
    if 0 <= max_batches <= i:
      break
    sums, memory = compiled_eval_step(params, memory, sharding.global_batch(local, batch_sharding))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    return {"loss": float("nan"), "accuracy": float("nan"), "bits_per_byte": float("nan")}
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  loss = float(totals["loss_sum"]) / count
  return {
    "loss": loss,
    "accuracy": float(totals["correct_sum"]) / count,
    "bits_per_byte": loss / math.log(2),
    "num_tokens": float(totals["count"]),
  }


# config.model keys that change no parameter: dropout, the compute dtype, the
# attention's kwargs (kernel choice, chunk sizes, hash rounds), the evaluation
# memory length, gradient truncation and rematerialization.
_NOT_IN_FINGERPRINT = (
  "dropout_rate",
  "attention_dropout_rate",
  "dtype",
  "attention_kwargs",
  "eval_mem_len",
  "bptt_segments",
  "remat",
)


def model_fingerprint(config: ml_collections.ConfigDict, task) -> dict:
  """What must match for a checkpoint to belong to this model.

  Saved with every checkpoint; a workdir holding a checkpoint of another model
  (another attention, width, vocabulary) is refused instead of silently
  restarted or half restored.
  """
  # Settings that change no parameter may differ: dropout, the compute dtype,
  # and the attention's keyword arguments (kernel choice, chunk sizes, hash
  # rounds). A kwarg that does change parameters changes their shapes, which the
  # checkpointer compares separately.
  model = {k: v for k, v in config.model.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
  return {
    "task": config.task,
    "model": model,
    "vocab_size": int(task.vocab_size),
    "num_classes": int(task.num_classes),
  }
