"""Tasks by name: where each task's splits come from, its vocabulary and classes.

`load(config)` returns a `TaskData` whose splits ('train', 'validation',
'test') are read on first access, so evaluation never reads the training set.
Each split is a dict of equally long numpy arrays: the model's input fields
(e.g. 'inputs', or 'inputs1' and 'inputs2') and 'targets'.

`describe(config)` returns what training needs to know of a task without
touching its data (`train.py --dry_run` builds and compiles from it alone):
its vocabulary, classes, best-checkpoint rule and the shape and dtype of each
field of an example. `load` checks its TaskData against it.
"""

import copy
import os
from collections.abc import Callable

import ml_collections
import numpy as np

from efficient_transformers import paths
from efficient_transformers.data import base, listops
from efficient_transformers.errors import ConfigError, DataError

# The shared types live in `base` (the bottom of the package); re-exported here.
SPLITS, LazySplits, TaskData, TaskSpec = base.SPLITS, base.LazySplits, base.TaskData, base.TaskSpec


_TASKS: dict[str, Callable[[ml_collections.ConfigDict], TaskData]] = {}
_SPECS: dict[str, Callable[[ml_collections.ConfigDict], TaskSpec]] = {}


def register(name: str, describe: Callable[[ml_collections.ConfigDict], TaskSpec]):
  """Registers a task's loader under `name`, with the function that describes it."""

  def wrap(fn):
    _TASKS[name] = fn
    _SPECS[name] = describe
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
  spec = describe(config)
  data_dir = paths.resolve_local(config.data_dir, what="config.data_dir")
  if data_dir != config.data_dir:  # Relative, ~, a trailing slash: resolved once, here.
    config = copy.deepcopy(config)
    with config.unlocked():
      config.data_dir = data_dir
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(
      f"config.data_dir={data_dir} is a file, not a directory: point it at the directory "
      "that holds (or will hold) the task's data."
    )
  task = _TASKS[config.task](config, generate=generate and config.data.get("generate", True))
  if (task.vocab_size, task.num_classes, task.objective) != (
    spec.vocab_size,
    spec.num_classes,
    spec.objective,
  ):  # pragma: no cover - a task module out of step with its declaration.
    raise AssertionError(f"Task {config.task!r} loaded {task} but declares {spec}.")
  return task


def describe(config: ml_collections.ConfigDict) -> TaskSpec:
  """The TaskSpec of `config.task` at this config's lengths; reads and writes no data."""
  if config.task not in _TASKS:
    raise ConfigError(f"config.task={config.task!r} is unknown; valid: {', '.join(available())}.")
  return _SPECS[config.task](config)


def _classifier_spec(name: str, vocab_size: int, num_classes: int, **inputs: int) -> TaskSpec:
  fields = {k: ((length,), "int16") for k, length in inputs.items()}
  fields["targets"] = ((), "int32")
  # Evaluation batches add a weight per row: 0 for the padding of the last batch.
  return TaskSpec(name, vocab_size, num_classes, fields, {**fields, "weight": ((), "float32")})


def _listops_spec(config: ml_collections.ConfigDict) -> TaskSpec:
  length = config.model.max_length
  return _classifier_spec("listops", listops.VOCAB_SIZE, listops.NUM_CLASSES, inputs=length)


def _text_spec(config: ml_collections.ConfigDict) -> TaskSpec:
  from efficient_transformers.data import tfds_tasks

  length = config.model.max_length
  return _classifier_spec("text", tfds_tasks.VOCAB_SIZE, tfds_tasks.TEXT_CLASSES, inputs=length)


def _image_spec(config: ml_collections.ConfigDict) -> TaskSpec:
  from efficient_transformers.data import tfds_tasks

  if config.model.max_length != tfds_tasks.IMAGE_LENGTH:
    raise ConfigError(
      f"config.model.max_length must be {tfds_tasks.IMAGE_LENGTH} (32 x 32 pixels) for "
      f"CIFAR-10; got {config.model.max_length}."
    )
  vocab, classes = tfds_tasks.VOCAB_SIZE, tfds_tasks.IMAGE_CLASSES
  return _classifier_spec("image", vocab, classes, inputs=tfds_tasks.IMAGE_LENGTH)


def _retrieval_spec(config: ml_collections.ConfigDict) -> TaskSpec:
  from efficient_transformers.data import retrieval

  length = config.data.max_length
  if length > config.model.max_length:
    raise ConfigError(
      f"config.data.max_length={length} exceeds config.model.max_length="
      f"{config.model.max_length}; the model cannot embed documents that long. Set them equal."
    )
  vocab, classes = retrieval.VOCAB_SIZE, retrieval.NUM_CLASSES
  return _classifier_spec("retrieval", vocab, classes, inputs1=length, inputs2=length)


def _pathfinder_spec(config: ml_collections.ConfigDict) -> TaskSpec:
  from efficient_transformers.data import pathfinder

  resolution = config.data.resolution
  pathfinder.check_params(resolution, config.data.difficulty)
  if config.model.max_length < resolution * resolution:
    raise ConfigError(
      f"config.model.max_length={config.model.max_length} is shorter than the "
      f"{resolution * resolution} pixels of a {resolution}x{resolution} image; set it to "
      f"{resolution * resolution}."
    )
  vocab, classes = pathfinder.VOCAB_SIZE, pathfinder.NUM_CLASSES
  return _classifier_spec(config.task, vocab, classes, inputs=config.model.max_length)


def _byte_lm_spec(config: ml_collections.ConfigDict) -> TaskSpec:
  from efficient_transformers.data import byte_lm

  corpus, _ = byte_lm._corpus_args(config)
  vocab = byte_lm.VOCAB_SIZE
  train, evaluation = byte_lm.segment_lengths(config)
  return TaskSpec(
    f"byte_lm/{corpus}",
    vocab,
    vocab,
    byte_lm.fields(train),
    byte_lm.fields(evaluation),
    objective="next_token",
    best_metric="loss",
    best_mode="min",
  )


@register("listops", _listops_spec)
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
    splits=LazySplits(read),
  )


# The other LRA tasks live in their own modules, imported when used: they import this
# one (TaskData), and TFDS is slow to import.
@register("text", _text_spec)
def _text(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import tfds_tasks

  return tfds_tasks.load_text(config, generate=generate)


@register("image", _image_spec)
def _image(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import tfds_tasks

  return tfds_tasks.load_image(config, generate=generate)


@register("retrieval", _retrieval_spec)
def _retrieval(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import retrieval

  return retrieval.load_task(config, generate=generate)


@register("byte_lm", _byte_lm_spec)
def _byte_lm(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import byte_lm

  return byte_lm.load_task(config, generate=generate)


@register("pathfinder", _pathfinder_spec)
@register("pathx", _pathfinder_spec)
def _pathfinder(config: ml_collections.ConfigDict, *, generate: bool) -> TaskData:
  from efficient_transformers.data import pathfinder

  return pathfinder.load_task(config, generate=generate)
