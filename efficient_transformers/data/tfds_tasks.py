"""LRA Text (IMDB bytes) and Image (CIFAR-10 in grayscale) from TensorFlow Datasets, without TF.

Both datasets are read through TFDS's random-access data source
(`builder.as_data_source`), which reads `array_record` files with numpy and
protobuf only: TensorFlow is needed once, to *prepare* the files (CIFAR-10's
PNG encoding calls TF), never to train. Nothing here downloads; a dataset
missing from `config.data_dir` is a DataError that prints the command that
prepares it:

  pip install tensorflow importlib_resources
  python -c "import tensorflow_datasets as tfds; \
    tfds.builder('imdb_reviews/plain_text', data_dir='data/tfds').download_and_prepare(\
    file_format='array_record')"
  (the same with 'cifar10'; files land in data/tfds/<name>/<version>/)

Both tasks validate on a seeded 10% of TFDS's train split and test on its test
split. (The original LRA code validated IMDB on the test set, so its model
selection saw the test data.)

Tokens: a byte or gray level v is token v + 1; 0 is padding; vocabulary 257.
"""

import logging
import os
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from efficient_transformers.data import base
from efficient_transformers.errors import ConfigError, DataError

_log = logging.getLogger(__name__)

IMDB = "imdb_reviews/plain_text"
CIFAR10 = "cifar10"
VOCAB_SIZE = 257  # 256 byte or gray values, shifted by one, and padding 0.
TEXT_CLASSES = 2
IMAGE_CLASSES = 10
IMAGE_LENGTH = 32 * 32
# tf.image.rgb_to_grayscale's weights (ITU-R BT.601 luma, rounded to 4 digits),
# so our gray levels are those the original LRA pipeline fed its models.
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that downloads and prepares TFDS dataset `name` into `data_dir`."""
  return (
    'pip install tensorflow importlib_resources && python -c "import tensorflow_datasets as '
    f"tfds; tfds.builder('{name}', data_dir='{data_dir}')"
    ".download_and_prepare(file_format='array_record')\""
  )


def open_split(name: str, split: str, data_dir: str) -> Sequence[dict]:
  """TFDS's random-access source of one prepared split; never downloads.

  This is the only function that touches TFDS (imported here: it is slow to
  import). Every failure becomes a DataError saying what is missing and how to
  prepare it.

  Args:
    name: a TFDS name, e.g. 'imdb_reviews/plain_text'.
    split: a TFDS split name, e.g. 'train'.
    data_dir: the TFDS data directory holding `<dataset>/<config>/<version>/`.

  Returns:
    A sequence of examples; each a dict of numpy arrays, str or bytes.
  """
  import tensorflow_datasets as tfds

  builder = None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    return builder.as_data_source(split=split)
  except Exception as e:  # TFDS raises many types; the user needs one message.
    raise _read_error(name, data_dir, builder, e) from None


def _read_error(name: str, data_dir: str, builder, error: Exception) -> DataError:
  where = os.path.abspath(builder.data_dir if builder is not None else os.path.join(data_dir, name))
  fix = f"Prepare it (once; needs network and TensorFlow) with: {prepare_command(name, data_dir)}"
  if builder is None or not builder.is_prepared():
    return DataError(
      f"TFDS dataset {name!r} is not in config.data_dir={data_dir!r}: {where} has no prepared "
      f"dataset (dataset_info.json and *.array_record-* files). {fix}; or copy a directory "
      f"prepared elsewhere to {where}."
    )
  file_format = builder.info.file_format
  if file_format is not None and file_format.value not in ("array_record", "parquet"):
    return DataError(
      f"TFDS dataset {name!r} in {where} is in the {file_format.value} format, which needs "
      f"TensorFlow to read. Delete {where} and prepare it again in the array_record format: "
      f"{prepare_command(name, data_dir)}"
    )
  return DataError(f"Could not read TFDS dataset {name!r} from {where}: {error}. {fix}")


def _examples(source: Sequence[dict], indices: np.ndarray, what: str) -> list[dict]:
  """Reads `source[i]` for each index; a damaged file becomes a DataError."""
  try:
    # One at a time: batched `__getitems__` is missing from tfds.testing's mock source.
    return [source[int(i)] for i in indices]
  except Exception as e:
    raise DataError(
      f"Could not read {what}: {e}. The prepared files may be damaged; delete them and "
      "prepare the dataset again."
    ) from None


def split_indices(num: int, *, validation_fraction: float, seed: int) -> dict[str, np.ndarray]:
  """Carves a validation set out of `num` training examples, by seed.

  Args:
    num: examples in TFDS's train split (after any `max_examples` cap).
    validation_fraction: the share that goes to validation, in (0, 1).
    seed: the seed of the permutation; the same seed gives the same split.

  Returns:
    {'train': sorted indices, 'validation': sorted indices}, disjoint, covering range(num).
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ConfigError(
      f"config.data.validation_fraction must lie in (0, 1); got {validation_fraction}."
    )
  num_val = int(round(num * validation_fraction))
  if not 0 < num_val < num:
    raise DataError(
      f"Cannot carve a validation fraction {validation_fraction} from {num} training examples: "
      "it would leave one of the two splits empty."
    )
  order = np.random.default_rng(seed).permutation(num)
  return {"train": np.sort(order[num_val:]), "validation": np.sort(order[:num_val])}


def bytes_to_tokens(texts: Sequence[bytes | str], max_length: int) -> np.ndarray:
  """UTF-8 bytes as tokens byte + 1, cut or right-padded with 0 to `max_length`.

  Returns:
    int16 [len(texts), max_length].
  """
  out = np.zeros((len(texts), max_length), np.int16)
  for row, text in enumerate(texts):
    raw = np.frombuffer(text.encode() if isinstance(text, str) else text, np.uint8)[:max_length]
    out[row, : raw.size] = raw.astype(np.int16) + 1
  return out


def rgb_to_grayscale(images: np.ndarray) -> np.ndarray:
  """Gray levels of uint8 RGB images, exactly as tf.image.rgb_to_grayscale computes them.

  In float32: v = 0.2989 r + 0.5870 g + 0.1140 b on values scaled to [0, 1],
  then back to uint8 as TF converts floats, floor(v x 255.5). E.g. pure green
  (0, 255, 0) gives 149 (rounding 0.587 x 255 would give 150).

  Args:
    images: uint8 [..., 3].

  Returns:
    uint8 [...].
  """
  if images.dtype != np.uint8 or images.shape[-1:] != (3,):
    raise DataError(f"Expected uint8 RGB images [..., 3]; got {images.dtype} {images.shape}.")
  scaled = images.astype(np.float32) * np.float32(1.0 / 255.0)
  gray = scaled @ GRAY_WEIGHTS
  return (gray * np.float32(255.5)).astype(np.uint8)


def _text_arrays(examples: list[dict], max_length: int) -> dict[str, np.ndarray]:
  texts = [ex["text"].encode() if isinstance(ex["text"], str) else ex["text"] for ex in examples]
  longer = sum(len(text) > max_length for text in texts)
  if longer:
    _log.info("IMDB: cut %d of %d reviews to %d bytes.", longer, len(texts), max_length)
  inputs = bytes_to_tokens(texts, max_length)
  return {"inputs": inputs, "targets": np.array([ex["label"] for ex in examples], np.int32)}


def _image_arrays(examples: list[dict], max_length: int) -> dict[str, np.ndarray]:
  if max_length != IMAGE_LENGTH:
    raise ConfigError(
      f"config.model.max_length must be {IMAGE_LENGTH} (32 x 32 pixels) for CIFAR-10; "
      f"got {max_length}."
    )
  images = np.stack([ex["image"] for ex in examples]) if examples else np.zeros((0, 32, 32, 3))
  if images.shape[1:] != (32, 32, 3):
    raise DataError(f"CIFAR-10 images must be 32 x 32 x 3; got {images.shape[1:]}.")
  gray = rgb_to_grayscale(images.astype(np.uint8)).reshape(len(examples), IMAGE_LENGTH)
  return {
    "inputs": gray.astype(np.int16) + 1,
    "targets": np.array([ex["label"] for ex in examples], np.int32),
  }


def _load(
  config: ml_collections.ConfigDict,
  *,
  task: str,
  name: str,
  num_classes: int,
  to_arrays: Callable[[list[dict], int], dict[str, np.ndarray]],
) -> base.TaskData:
  data_dir = config.data_dir
  max_examples = config.data.max_examples

  def source_and_size(tfds_split: str) -> tuple[Sequence[dict], int]:
    source = open_split(name, tfds_split, data_dir)
    return source, len(source) if max_examples <= 0 else min(len(source), max_examples)

  def read(split: str) -> dict[str, np.ndarray]:
    if split == "test":
      source, num = source_and_size("test")
      indices = np.arange(num)
    else:
      source, num = source_and_size("train")
      indices = split_indices(
        num, validation_fraction=config.data.validation_fraction, seed=config.data.split_seed
      )[split]
    what = f"split {split!r} of TFDS dataset {name!r} in {data_dir}"
    return to_arrays(_examples(source, indices, what), config.model.max_length)

  return base.TaskData(
    name=task, vocab_size=VOCAB_SIZE, num_classes=num_classes, splits=base.LazySplits(read)
  )


def load_text(config: ml_collections.ConfigDict, *, generate: bool) -> base.TaskData:
  """LRA Text: IMDB reviews as UTF-8 bytes, positive or negative.

  Args:
    config: uses data_dir (the TFDS data directory), data.validation_fraction,
      data.split_seed, data.max_examples (0 = all) and model.max_length.
    generate: ignored: TFDS data cannot be made offline (see `prepare_command`).

  Returns:
    Lazy splits of {'inputs': int16 [N, max_length] bytes + 1, 'targets': int32 [N]}:
    train and validation from TFDS 'train' (25,000 reviews), test = TFDS 'test'.
  """
  del generate
  return _load(config, task="text", name=IMDB, num_classes=TEXT_CLASSES, to_arrays=_text_arrays)


def load_image(config: ml_collections.ConfigDict, *, generate: bool) -> base.TaskData:
  """LRA Image: CIFAR-10 in grayscale, one token per pixel in row-major order.

  Args:
    config: uses data_dir (the TFDS data directory), data.validation_fraction,
      data.split_seed, data.max_examples (0 = all) and model.max_length (1024).
    generate: ignored: TFDS data cannot be made offline (see `prepare_command`).

  Returns:
    Lazy splits of {'inputs': int16 [N, 1024] gray + 1, 'targets': int32 [N] in 0-9}:
    train (45,000) and validation (5,000) from TFDS 'train', test = TFDS 'test' (10,000).
  """
  del generate
  return _load(
    config, task="image", name=CIFAR10, num_classes=IMAGE_CLASSES, to_arrays=_image_arrays
  )
