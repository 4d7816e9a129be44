"""The bottom of the data package: what a task hands to training, and lazy splits.

Every task module (listops, pathfinder, retrieval, tfds_tasks, byte_lm) builds
its `TaskData` from here, and `tasks` (the registry by name) imports the task
modules, so nothing in the package imports upward. Below this module is only
`pipeline` (the batchings, on Grain).

A task tells training three things, and training asks nothing else of it:
how its splits are batched (`batching`), what the model is scored on
(`objective`: "classification" or "next_token", the names of
`training.objectives`), and which validation metric picks the best checkpoint.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from efficient_transformers.data import pipeline

SPLITS = ("train", "validation", "test")


class LazySplits(Mapping):
  """A read-on-first-access mapping split name -> that split's arrays.

  Args:
    read: split name -> {field: array}; called at most once per split.
  """

  def __init__(self, read: Callable[[str], dict[str, np.ndarray]]):
    self._read = read
    self._cache: dict[str, dict[str, np.ndarray]] = {}

  def __getitem__(self, split: str) -> dict[str, np.ndarray]:
    if split not in SPLITS:
      raise KeyError(f"Unknown split {split!r}; splits are {SPLITS}.")
    if split not in self._cache:
      self._cache[split] = self._read(split)
    return self._cache[split]

  def __iter__(self) -> Iterator[str]:
    return iter(SPLITS)

  def __len__(self) -> int:
    return len(SPLITS)


@dataclasses.dataclass(frozen=True)
class TaskData:
  """A task's data and what training needs to know about it.

  Example tasks (the LRA classifiers) hold equally long example arrays per
  split, batched by `pipeline.Examples`. Stream tasks (language modelling)
  hold one token stream per split ({"tokens": [n], ...}), batched in order by
  `pipeline.Streams`.
  """

  name: str
  vocab_size: int
  num_classes: int
  splits: Mapping[str, dict[str, np.ndarray]]
  batching: Any = pipeline.EXAMPLES  # pipeline.Examples() or pipeline.Streams(...).
  objective: str = "classification"
  # The validation metric that picks the best checkpoint, and whether higher is better.
  best_metric: str = "accuracy"
  best_mode: str = "max"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task as the model and the train step see it, known from the config alone.

  `fields` maps each field of one row of a training batch to its shape
  (without the batch axis) and numpy dtype, `eval_fields` likewise for an
  evaluation batch (example tasks add a "weight"; stream tasks cut shorter
  segments). `objective` and the best rule are those of the `TaskData`.
  """

  name: str
  vocab_size: int
  num_classes: int
  fields: Mapping[str, tuple[tuple[int, ...], str]]
  eval_fields: Mapping[str, tuple[tuple[int, ...], str]]
  objective: str = "classification"
  best_metric: str = "accuracy"
  best_mode: str = "max"
