"""Tasks by name: where each task's splits come from, its vocabulary and classes.

`load(config)` returns a `TaskData` whose splits ('train', 'validation',
'test') are read on first access, so evaluation never reads the training set.
Each split is a dict of equally long numpy arrays: the model's input fields
(e.g. 'inputs', or 'inputs1' and 'inputs2') and 'targets'.
"""

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping

import ml_collections
import numpy as np

from efficient_transformers.data import listops
from efficient_transformers.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")


class _LazySplits(Mapping):
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


_TASKS: dict[str, Callable[[ml_collections.ConfigDict], TaskData]] = {}


def register(name: str):
  def wrap(fn):
    _TASKS[name] = fn
    return fn

  return wrap


def available() -> list[str]:
  return sorted(_TASKS)


def load(config: ml_collections.ConfigDict, *, generate: bool = True) -> TaskData:
  """The task named by `config.task`, its data under `config.data_dir`.

  Args:
    config: the run's config.
    generate: whether a task that can generate its data (ListOps) may do so
      when `data_dir` has none (and `config.data.generate` allows it).
      Evaluation passes False: a missing test set there is a wrong path.
  """
  if config.task not in _TASKS:
    raise ConfigError(f"config.task={config.task!r} is unknown; valid: {', '.join(available())}.")
  return _TASKS[config.task](config, generate=generate and config.data.get("generate", True))


@register("listops")
def _listops(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  params = config.data.to_dict()
  params.pop("generate", None)
  seed = params.pop("generator_seed")
  if generate:
    # Reads the release's (or earlier generated) TSVs if present, else generates them.
    listops.ensure_data(config.data_dir, seed=seed, **params)
  else:
    missing = [
      listops.split_path(config.data_dir, s)
      for s in listops.SPLITS
      if not os.path.exists(listops.split_path(config.data_dir, s))
    ]
    if missing:
      raise DataError(
        f"ListOps data missing in config.data_dir={config.data_dir!r}: {', '.join(missing)}. "
        f"Point config.data_dir at the training data, or generate it with: "
        f"python -m efficient_transformers.data.listops --data_dir={config.data_dir}"
      )
  file_split = {"train": "train", "validation": "val", "test": "test"}

  def read(split: str) -> dict[str, np.ndarray]:
    arrays = listops.load_split(
      config.data_dir, file_split[split], max_length=config.model.max_length
    )
    # A small vocabulary: int16 halves host memory for the 96K x 2000 train split.
    return {
      "inputs": arrays["inputs"].astype(np.int16),
      "targets": arrays["targets"].astype(np.int32),
    }

  return TaskData(
    name="listops",
    vocab_size=listops.VOCAB_SIZE,
    num_classes=listops.NUM_CLASSES,
    splits=_LazySplits(read),
  )


# The other LRA tasks live in their own modules, imported when used: they import this
# one (TaskData), and TFDS is slow to import.
@register("text")
def _text(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import tfds_tasks

  return tfds_tasks.load_text(config, generate=generate)


@register("image")
def _image(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import tfds_tasks

  return tfds_tasks.load_image(config, generate=generate)


@register("retrieval")
def _retrieval(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import retrieval

  return retrieval.load_task(config, generate=generate)


@register("byte_lm")
def _byte_lm(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import byte_lm

  return byte_lm.load_task(config, generate=generate)


@register("pathfinder")
@register("pathx")
def _pathfinder(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import pathfinder

  return pathfinder.load_task(config, generate=generate)
