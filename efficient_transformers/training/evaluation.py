"""Evaluation over a whole split, and what identifies a model for checkpoints."""

from collections.abc import Callable, Iterable

import jax
import ml_collections
import numpy as np

from efficient_transformers.training import sharding


def evaluate(
  compiled_eval_step: Callable,
  params: dict,
  carry,
  batches: Iterable[dict[str, np.ndarray]],
  batch_sharding,
  objective,
  *,
  max_batches: int = -1,
) -> dict[str, float]:
  """The objective's metrics over `batches`, in order, the carry passed from batch to batch.

  `carry` is the empty carry to start from (None for classifiers; a language
  model's evaluation memory, whose length may exceed the training one); it is
  consumed. Padding (weight-0 rows, target-0 tokens) counts nowhere. Every
  process iterates the same number of batches (the pipelines pad), so the SPMD
  eval step never waits on a process that ran out of data.
  """
  totals = None
  for i, local in enumerate(batches):
    if 0 <= max_batches <= i:
      break
    sums, carry = compiled_eval_step(params, carry, sharding.global_batch(local, batch_sharding))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return objective.summarize(totals)


# config.model keys that change no parameter: dropout, the compute dtype, the
# attention's kwargs (kernel choice, chunk sizes, hash rounds), the evaluation
# memory length, gradient truncation and rematerialization (the segmented
# classifier's `remat`, the stack's `remat_policy`).
_NOT_IN_FINGERPRINT = (
  "dropout_rate",
  "attention_dropout_rate",
  "dtype",
  "attention_kwargs",
  "eval_mem_len",
  "bptt_segments",
  "remat",
  "remat_policy",
  "quantization",  # Fake quantization in the forward pass changes no parameter.
  "pretrain_objective",  # Self-pretraining's objective and masking rate: neither.
  "mask_rate",
)
# Keys fingerprinted only away from these values, so that checkpoints saved before the key
# existed still match a config that leaves it at its default.
_FINGERPRINTED_IF_SET = {"heads_per_layer": ()}


STATE_LAYOUT = 2


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
  model = {
    k: v
    for k, v in config.model.to_dict().items()
    if k not in _NOT_IN_FINGERPRINT
    and not (k in _FINGERPRINTED_IF_SET and tuple(v) == _FINGERPRINTED_IF_SET[k])
  }
  return {
    # What the train state holds: 2 = params, opt_state, step and, for models
    # with a memory, "carry" (until 2026-12 "memory"). Older checkpoints are
    # refused with this key named, not with a list of missing arrays.
    "state_layout": STATE_LAYOUT,
    "task": config.task,
    "model": model,
    "vocab_size": int(task.vocab_size),
    "num_classes": int(task.num_classes),
  }
