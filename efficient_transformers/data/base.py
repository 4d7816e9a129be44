"""The bottom of the data package: what a task hands to training, and lazy splits.

Every task module (listops, pathfinder, retrieval, tfds_tasks, byte_lm) builds
its `TaskData` from here, and `tasks` (the registry by name) imports the task
modules, so nothing in the package imports upward.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np

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
  split, batched by `pipeline.train_iterator` / `eval_batches`. Stream tasks
  (`stream=True`, language modelling) hold one token stream per split
  ({"tokens": [n], ...}), batched in order by `pipeline.stream_*`.
  """

  name: str
  vocab_size: int
  num_classes: int
  splits: Mapping[str, dict[str, np.ndarray]]
  stream: bool = False
  # The validation metric that picks the best checkpoint, and whether higher is better.
  best_metric: str = "accuracy"
  best_mode: str = "max"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task as the model and the train step see it, known from the config alone.

  `fields` maps each field of an example of an example task to its shape
  (without the batch axis) and numpy dtype; stream tasks have none (their
  batches are cut from the stream at the config's segment lengths).
  """

  name: str
  vocab_size: int
  num_classes: int
  fields: Mapping[str, tuple[tuple[int, ...], str]]
  stream: bool = False
  best_metric: str = "accuracy"
  best_mode: str = "max"
