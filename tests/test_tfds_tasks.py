"""LRA Text and Image from TFDS, without TensorFlow: tokens, splits, errors, training.

Two kinds of fake data, neither needing TensorFlow or the network:
- `tfds.testing.mock_data`, which replaces `builder.as_data_source` (random
  examples, or our own through `as_data_source_fn`);
- real array_record files written by TFDS's own `download_and_prepare` from
  examples we supply, so the reader is tested on the prepared format too.
"""

import io
import json
import os
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs.lra import image as image_config
from configs.lra import text as text_config
from efficient_transformers.data import tfds_tasks
from efficient_transformers.errors import DataError
from efficient_transformers.training import train_and_evaluate
from tests import helpers

USE_CODE = tfds.testing.MockPolicy.USE_CODE


def _config(module, data_dir, arg: str = ""):
  """The smoke config shrunk to seconds (as tests/helpers.py tiny_config)."""
  c = module.get_config("smoke,attention=softmax" + arg)
  c.data_dir = str(data_dir)
  helpers.shrink(c)
  return c


def _texts(n: int, seed: int) -> list[dict]:
  """Reviews of 0 to 90 bytes (some non-ASCII) starting with their index, labels alternating."""
  rng = np.random.default_rng(seed)
  return [
    {"text": f"{i:03d} caf\u00e9 " + "x" * int(rng.integers(0, 80)), "label": i % 2}
    for i in range(n)
  ]


def _images(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [
    {"id": f"img{i}", "image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": i % 10}
    for i in range(n)
  ]


def _source_fn(splits: dict[str, list[dict]]):
  """An `as_data_source` replacement for mock_data returning our examples."""

  def as_data_source(self, split, **kwargs):
    del self, kwargs
    return splits[split]

  return as_data_source


def _prepare(name: str, data_dir, splits: dict[str, list[dict]]) -> str:
  """Writes `splits` as a prepared TFDS dataset (array_record) with TFDS's own writer."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  cls = type(builder)

  def split_generators(self, dl_manager):
    del self, dl_manager
    return {s: ((f"{s}{i}", ex) for i, ex in enumerate(exs)) for s, exs in splits.items()}

  def encode_png(self, image):  # TFDS encodes with TensorFlow; PIL writes the same PNG format.
    del self
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()

  # TFDS looks for a checksums file beside the builder's code through
  # importlib_resources, not installed here; a builder without code path skips that.
  cls.code_path = None
  try:
    with (
      mock.patch.object(cls, "_split_generators", split_generators),
      mock.patch.object(tfds.features.Image, "encode_example", encode_png),
    ):
      builder.download_and_prepare(file_format="array_record")
  finally:
    del cls.code_path
  return builder.data_dir


def _check_tokens(arrays: dict, num: int, length: int, num_classes: int) -> None:
  inputs, targets = arrays["inputs"], arrays["targets"]
  assert inputs.shape == (num, length) and inputs.dtype == np.int16
  assert targets.shape == (num,) and targets.dtype == np.int32
  assert inputs.min() >= 0 and inputs.max() <= 256
  assert ((targets >= 0) & (targets < num_classes)).all()
  # Padding only at the end of a row.
  real = inputs != 0
  assert (real[:, :-1] | ~real[:, 1:]).all()


def _row_bytes(row: np.ndarray) -> bytes:
  return bytes((row[row != 0] - 1).astype(np.uint8).tolist())


# --- Token conversions -------------------------------------------------------


def test_rgb_to_grayscale_hand_computed():
  # floor((0.2989 r + 0.5870 g + 0.1140 b) / 255 x 255.5), as tf.image.rgb_to_grayscale.
  pixels = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]
  image = np.array([pixels], np.uint8)  # [1, 6, 3]
  gray = tfds_tasks.rgb_to_grayscale(image)
  assert gray.dtype == np.uint8
  np.testing.assert_array_equal(gray, [[0, 255, 76, 149, 29, 18]])
  with pytest.raises(DataError, match="uint8 RGB"):
    tfds_tasks.rgb_to_grayscale(np.zeros((2, 2, 4), np.uint8))


def test_bytes_to_tokens_shifts_cuts_and_pads():
  tokens = tfds_tasks.bytes_to_tokens([b"h\x00", "\u00e9t\u00e9!", b""], max_length=4)
  assert tokens.dtype == np.int16
  # A NUL byte is token 1, not padding; "é" is the two bytes C3 A9.
  np.testing.assert_array_equal(
    tokens, [[105, 1, 0, 0], [0xC3 + 1, 0xA9 + 1, 117, 0xC3 + 1], [0, 0, 0, 0]]
  )


# --- Loaders under tfds.testing.mock_data --------------------------------------


def test_text_loader_on_random_mock_data(tmp_path):
  config = _config(text_config, tmp_path, ",length=48")
  with tfds.testing.mock_data(num_examples=30, policy=USE_CODE):
    task = tfds_tasks.load_text(config, generate=False)
    splits = {name: task.splits[name] for name in ("train", "validation", "test")}
  assert (task.name, task.vocab_size, task.num_classes) == ("text", 257, 2)
  _check_tokens(splits["train"], 27, 48, 2)
  _check_tokens(splits["validation"], 3, 48, 2)
  _check_tokens(splits["test"], 30, 48, 2)


def test_image_loader_on_random_mock_data(tmp_path):
  config = _config(image_config, tmp_path)
  with tfds.testing.mock_data(num_examples=20, policy=USE_CODE):
    task = tfds_tasks.load_image(config, generate=False)
    splits = {name: task.splits[name] for name in ("train", "validation", "test")}
  assert (task.name, task.vocab_size, task.num_classes) == ("image", 257, 10)
  for name, num in (("train", 18), ("validation", 2), ("test", 20)):
    _check_tokens(splits[name], num, 1024, 10)
    assert splits[name]["inputs"].min() >= 1  # Every pixel is a token; none is padding.


def test_text_validation_is_carved_from_train_by_seed(tmp_path):
  train, test = _texts(40, seed=1), _texts(7, seed=2)
  source = _source_fn({"train": train, "test": test})

  def load(seed: int) -> dict:
    config = _config(text_config, tmp_path, ",length=24")
    config.data.split_seed = seed
    with tfds.testing.mock_data(policy=USE_CODE, as_data_source_fn=source):
      task = tfds_tasks.load_text(config, generate=False)
      return {name: task.splits[name] for name in ("train", "validation", "test")}

  def ids(arrays: dict) -> list[int]:
    return [int(_row_bytes(row)[:3]) for row in arrays["inputs"]]

  first, again, other = load(0), load(0), load(1)
  train_ids, val_ids = ids(first["train"]), ids(first["validation"])
  assert len(val_ids) == 4 and sorted(train_ids + val_ids) == list(range(40))
  assert ids(again["validation"]) == val_ids and ids(again["train"]) == train_ids
  assert ids(other["validation"]) != val_ids
  assert ids(first["test"]) == list(range(7))  # The test split is TFDS's, whole.
  # Each row is its review's bytes + 1, cut to 24 or zero-padded; targets follow.
  for split, examples, index in (("train", train, train_ids), ("test", test, range(7))):
    for row, target, i in zip(first[split]["inputs"], first[split]["targets"], index, strict=True):
      assert _row_bytes(row) == examples[i]["text"].encode()[:24]
      assert target == examples[i]["label"]
  assert (first["train"]["inputs"] != 0).sum(axis=1).max() == 24


def test_max_examples_caps_each_tfds_split(tmp_path):
  config = _config(text_config, tmp_path, ",length=16")
  config.data.max_examples = 20
  source = _source_fn({"train": _texts(40, seed=1), "test": _texts(30, seed=2)})
  with tfds.testing.mock_data(policy=USE_CODE, as_data_source_fn=source):
    task = tfds_tasks.load_text(config, generate=False)
    sizes = {name: len(task.splits[name]["targets"]) for name in ("train", "validation", "test")}
  assert sizes == {"train": 18, "validation": 2, "test": 20}


def test_image_tokens_are_gray_levels_plus_one(tmp_path):
  train, test = _images(10, seed=3), _images(4, seed=4)
  source = _source_fn({"train": train, "test": test})
  config = _config(image_config, tmp_path)
  config.data.validation_fraction = 0.2
  with tfds.testing.mock_data(policy=USE_CODE, as_data_source_fn=source):
    task = tfds_tasks.load_image(config, generate=False)
    test_arrays = task.splits["test"]
    carved = task.splits["train"]["targets"].size, task.splits["validation"]["targets"].size
  assert carved == (8, 2)
  expected = tfds_tasks.rgb_to_grayscale(np.stack([ex["image"] for ex in test]))
  np.testing.assert_array_equal(test_arrays["inputs"], expected.reshape(4, 1024) + 1)
  np.testing.assert_array_equal(test_arrays["targets"], [0, 1, 2, 3])


# --- Prepared files and missing data (no mock: TFDS reads the directory) -----


def test_reads_prepared_array_record_files(tmp_path):
  texts, images = _texts(20, seed=5), _images(10, seed=6)
  _prepare(tfds_tasks.IMDB, tmp_path, {"train": texts, "test": texts[:5]})
  _prepare(tfds_tasks.CIFAR10, tmp_path, {"train": images, "test": images[:3]})

  text = tfds_tasks.load_text(_config(text_config, tmp_path, ",length=32"), generate=False)
  rows = np.concatenate([text.splits["train"]["inputs"], text.splits["validation"]["inputs"]])
  assert sorted(_row_bytes(row) for row in rows) == sorted(ex["text"].encode()[:32] for ex in texts)
  assert len(text.splits["validation"]["inputs"]) == 2

  image = tfds_tasks.load_image(_config(image_config, tmp_path), generate=False)
  test = image.splits["test"]
  expected = {
    (ex["label"], (tfds_tasks.rgb_to_grayscale(ex["image"]).ravel().astype(np.int16) + 1).tobytes())
    for ex in images[:3]
  }
  assert {
    (int(t), row.tobytes()) for row, t in zip(test["inputs"], test["targets"], strict=True)
  } == expected


def test_missing_dataset_names_path_and_prepare_command(tmp_path):
  empty = tmp_path / "tfds"
  for module, load, name, version_dir in (
    (text_config, tfds_tasks.load_text, "imdb_reviews/plain_text", "imdb_reviews/plain_text/1.0.0"),
    (image_config, tfds_tasks.load_image, "cifar10", "cifar10/3.0.2"),
  ):
    task = load(_config(module, empty), generate=True)
    with pytest.raises(DataError) as error:
      task.splits["train"]
    message = str(error.value)
    assert os.path.join(str(empty), version_dir) in message
    assert f"tfds.builder('{name}', data_dir='{empty}')" in message
    assert "download_and_prepare(file_format='array_record')" in message
    assert "pip install tensorflow" in message
  assert not os.path.exists(empty)  # Nothing was downloaded or created.


def test_dataset_prepared_as_tfrecord_asks_for_array_record(tmp_path):
  version_dir = _prepare(tfds_tasks.IMDB, tmp_path, {"train": _texts(10, 0), "test": _texts(2, 0)})
  info_path = os.path.join(version_dir, "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"  # What a plain download_and_prepare() writes.
  with open(info_path, "w") as f:
    json.dump(info, f)
  task = tfds_tasks.load_text(_config(text_config, tmp_path), generate=False)
  with pytest.raises(DataError, match="in the tfrecord format, which needs TensorFlow") as error:
    task.splits["test"]
  assert "file_format='array_record'" in str(error.value)


# --- Training ------------------------------------------------------------------


@pytest.mark.parametrize(
  "module, arg", [(text_config, ",length=32"), (image_config, "")], ids=["text", "image"]
)
def test_trains_two_steps(tmp_path, module, arg):
  config = _config(module, tmp_path / "data", arg)
  config.data.validation_fraction = 0.25
  workdir = str(tmp_path / "run")
  loader = {"text": tfds_tasks.load_text, "image": tfds_tasks.load_image}[config.task]
  with (
    tfds.testing.mock_data(num_examples=24, policy=USE_CODE),
    mock.patch.dict("efficient_transformers.data.tasks._TASKS", {config.task: loader}),
  ):
    final = train_and_evaluate(config, workdir)
  assert np.isfinite(final["loss"]) and 0.0 <= final["accuracy"] <= 1.0
  assert final["num_examples"] == 6  # The whole carved validation split.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in records)
