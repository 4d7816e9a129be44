"""Pathfinder / Path-X: the release layout read to tokens, the split, errors, configs, training.

Every fixture is written here in the LRA release's layout with Pillow:
`pathfinder<N>/<difficulty dir>/imgs/<batch>/<file>.png` and text
`metadata/<batch>.npy` lines.
"""

import json
import logging
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

import efficient_transformers.data
from configs.lra import pathfinder as pathfinder_config
from configs.lra import pathx as pathx_config
from efficient_transformers.data import pathfinder, tasks
from efficient_transformers.errors import ConfigError, DataError
from tests import helpers

ROW_TAIL = ["1.8", "14", "4", "2", "1", "1", "1"]  # Columns 5-11 of a full release row.


def write_set(root, batches, *, resolution=32, difficulty="hard", seed=0, columns=11):
  """Writes batches {batch name: image count}; returns (folder, [(pixels, label)] in LRA order).

  LRA order: batches sorted by number, lines in file order.
  """
  directory = os.path.join(
    str(root), f"pathfinder{resolution}", pathfinder.DIFFICULTIES[difficulty]
  )
  rng = np.random.default_rng(seed)
  examples = {}
  for batch, count in batches.items():
    os.makedirs(os.path.join(directory, "imgs", str(batch)), exist_ok=True)
    os.makedirs(os.path.join(directory, "metadata"), exist_ok=True)
    lines, examples[batch] = [], []
    for k in range(count):
      pixels = rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)
      pixels[0, :2] = (0, 255)  # The extremes: tokens 1 and 256.
      label = int(rng.integers(0, 2))
      Image.fromarray(pixels).save(os.path.join(directory, "imgs", str(batch), f"sample_{k}.png"))
      row = [f"imgs/{batch}", f"sample_{k}.png", str(k), str(label), *ROW_TAIL]
      lines.append(" ".join(row[:columns]))
      examples[batch].append((pixels, label))
    with open(os.path.join(directory, "metadata", f"{batch}.npy"), "w") as f:
      f.write("\n".join(lines) + "\n")
  ordered = [e for batch in sorted(examples, key=int) for e in examples[batch]]
  return directory, ordered


def make_config(data_dir, **data):
  c = pathfinder_config.get_config("smoke")
  c.data_dir = str(data_dir)
  c.data.generate = False
  c.data.num_workers = 1
  for key, value in data.items():
    c.data[key] = value
  return c


def read_all(task):
  return {split: task.splits[split] for split in tasks.SPLITS}


# Batches 0, 1, 2 and 10: numeric order puts 2 before 10 (text order would not).
BATCHES = {"10": 6, "0": 8, "2": 7, "1": 9}  # 30 images: 24 / 3 / 3.


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("release")
  directory, examples = write_set(root, BATCHES)
  return str(root), directory, examples


def test_reader_tokens_labels_and_split(release):
  root, _, examples = release
  task = pathfinder.load_task(make_config(root, cache=False), generate=False)
  assert (task.name, task.vocab_size, task.num_classes) == ("pathfinder", 257, 2)
  splits = read_all(task)
  assert [len(splits[s]["targets"]) for s in tasks.SPLITS] == [24, 3, 3]
  indices = pathfinder.split_indices(30, seed=0)
  for split in tasks.SPLITS:
    assert splits[split]["inputs"].dtype == np.int16 and splits[split]["inputs"].shape[1] == 1024
    assert splits[split]["targets"].dtype == np.int32
    for row, i in enumerate(indices[split]):
      pixels, label = examples[i]
      np.testing.assert_array_equal(
        splits[split]["inputs"][row], pixels.reshape(-1).astype(np.int16) + 1
      )
      assert splits[split]["targets"][row] == label
  everything = np.concatenate([indices[s] for s in tasks.SPLITS])
  assert sorted(everything) == list(range(30))
  assert splits["train"]["inputs"].min() == 1 and splits["train"]["inputs"].max() == 256


def test_split_is_deterministic_and_seeded(release):
  root, _, _ = release
  first = read_all(pathfinder.load_task(make_config(root, cache=False), generate=False))
  again = read_all(pathfinder.load_task(make_config(root, cache=False), generate=False))
  other = read_all(
    pathfinder.load_task(make_config(root, cache=False, split_seed=1), generate=False)
  )
  for split in tasks.SPLITS:
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(first[split][key], again[split][key])
  assert not np.array_equal(first["validation"]["inputs"], other["validation"]["inputs"])
  sizes = {s: len(v) for s, v in pathfinder.split_indices(200_000, seed=0).items()}
  assert sizes == {"train": 160_000, "validation": 20_000, "test": 20_000}  # LRA's sizes.


def test_cache_is_used_and_refreshed(tmp_path):
  directory, _ = write_set(tmp_path, {"0": 10})
  before = read_all(pathfinder.load_task(make_config(tmp_path), generate=False))
  assert os.path.exists(os.path.join(directory, pathfinder.CACHE_PIXELS))
  # With the images gone, the same split can only come from the cache.
  os.rename(os.path.join(directory, "imgs"), os.path.join(directory, "imgs_moved"))
  cached = read_all(pathfinder.load_task(make_config(tmp_path), generate=False))
  for split in tasks.SPLITS:
    np.testing.assert_array_equal(cached[split]["inputs"], before[split]["inputs"])
  # Changed metadata makes the cache stale: images are decoded again.
  with open(os.path.join(directory, "metadata", "0.npy"), "a") as f:
    f.write("imgs/0 sample_0.png 10 1\n")
  with pytest.raises(DataError, match="sample_0.png does not exist"):
    read_all(pathfinder.load_task(make_config(tmp_path), generate=False))


def test_rows_with_four_columns_and_empty_images(tmp_path, caplog):
  directory, _ = write_set(tmp_path, {"0": 10}, columns=4)
  empty = os.path.join(directory, "imgs", "0", "sample_3.png")
  open(empty, "wb").close()  # The release has one such file; LRA skipped it.
  task = pathfinder.load_task(make_config(tmp_path, cache=False), generate=False)
  with caplog.at_level(logging.WARNING):
    sizes = [len(task.splits[s]["targets"]) for s in tasks.SPLITS]
  assert sum(sizes) == 9
  assert "skipped 1 empty image file(s)" in caplog.text and empty in caplog.text


def test_corrupt_png_names_image_and_metadata_line(tmp_path):
  directory, _ = write_set(tmp_path, {"0": 4, "1": 4})
  bad = os.path.join(directory, "imgs", "1", "sample_2.png")
  with open(bad, "wb") as f:
    f.write(b"this is not a png")
  meta = os.path.join(directory, "metadata", "1.npy")
  task = pathfinder.load_task(make_config(tmp_path), generate=False)
  with pytest.raises(
    DataError, match=re.escape(f"{bad} is not a readable PNG") + ".*" + re.escape(f"{meta}, line 3")
  ):
    read_all(task)


def test_wrong_image_size_names_image(tmp_path):
  directory, _ = write_set(tmp_path, {"0": 4})
  bad = os.path.join(directory, "imgs", "0", "sample_1.png")
  Image.fromarray(np.zeros((16, 32), np.uint8)).save(bad)
  task = pathfinder.load_task(make_config(tmp_path, cache=False), generate=False)
  with pytest.raises(DataError, match=re.escape(f"{bad} is 32x16 pixels, expected 32x32")):
    read_all(task)


@pytest.mark.parametrize(
  "bad_line, message",
  [
    ("imgs/0 sample_0.png 0", "expected at least 4 space-separated columns .* got 3"),
    ("imgs/0 sample_0.png 0 2 1.8", "the label \\(column 4\\) must be 0 or 1, got '2'"),
  ],
)
def test_bad_metadata_line_names_file_and_line(tmp_path, bad_line, message):
  directory, _ = write_set(tmp_path, {"0": 3})
  meta = os.path.join(directory, "metadata", "0.npy")
  with open(meta) as f:
    lines = f.read().splitlines()
  lines.insert(1, bad_line)
  with open(meta, "w") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=re.escape(f"{meta}, line 2: ") + message):
    pathfinder.load_task(make_config(tmp_path), generate=False)


def test_unknown_resolution_or_difficulty_lists_valid_values(tmp_path):
  with pytest.raises(ConfigError, match="resolution=48 .*valid: 32, 64, 128, 256"):
    pathfinder_config.get_config("resolution=48")
  with pytest.raises(ConfigError, match="difficulty='medium' .*valid: easy, intermediate, hard"):
    pathfinder_config.get_config("difficulty=medium")
  for key, value in (("resolution", 48), ("difficulty", "medium")):
    with pytest.raises(ConfigError, match="valid: "):
      pathfinder.load_task(make_config(tmp_path, **{key: value}), generate=False)


def test_missing_directory_names_path_source_and_command(tmp_path):
  config = make_config(tmp_path / "nowhere")
  expected = os.path.join(str(tmp_path / "nowhere"), "pathfinder32", "curv_contour_length_14")
  with pytest.raises(DataError) as e:
    pathfinder.load_task(config, generate=True)  # config.data.generate is False.
  message = str(e.value)
  assert f"{expected} does not exist" in message
  assert "lra_release.gz" in message and "lra_release/pathfinder32" in message
  assert (
    "python -m efficient_transformers.data.pathfinder_generator "
    f"--out_dir={tmp_path / 'nowhere'} --resolution=32 --difficulty=hard --num_images=2000 "
    "--seed=0 --num_workers=1" in message
  )


def test_full_size_set_is_not_generated_implicitly(tmp_path):
  config = make_config(tmp_path, generate=True, num_images=200_000)
  with pytest.raises(DataError, match="--num_images=200000 .*Not generated automatically"):
    pathfinder.load_task(config, generate=True)


def test_smoke_set_generated_through_the_generator_api(tmp_path, monkeypatch):
  calls = []

  class FakeGenerator:
    @staticmethod
    def generate(out_dir, **kwargs):
      calls.append((out_dir, kwargs))
      write_set(out_dir, {"0": 10})

  monkeypatch.setattr(
    efficient_transformers.data, "pathfinder_generator", FakeGenerator, raising=False
  )
  task = pathfinder.load_task(make_config(tmp_path, generate=True), generate=True)
  assert calls == [
    (
      str(tmp_path),
      dict(resolution=32, difficulty="hard", num_images=2000, seed=0, num_workers=1),
    )
  ]
  assert len(task.splits["train"]["targets"]) == 8


def test_absent_generator_is_a_data_error_with_the_command(tmp_path, monkeypatch):
  monkeypatch.delattr(efficient_transformers.data, "pathfinder_generator", raising=False)
  monkeypatch.setitem(sys.modules, "efficient_transformers.data.pathfinder_generator", None)
  with pytest.raises(
    DataError, match="pathfinder_generator --out_dir=.*The generator cannot be imported"
  ):
    pathfinder.load_task(make_config(tmp_path, generate=True), generate=True)


def test_configs_data_keys_and_lengths():
  smoke = pathfinder_config.get_config("smoke,attention=softmax")
  assert (smoke.data.resolution, smoke.data.difficulty, smoke.model.max_length) == (
    32,
    "hard",
    1024,
  )
  assert smoke.data_dir == "data/lra/pathfinder_smoke" and smoke.data.generate
  assert smoke.data.num_images == 2_000
  easy = pathfinder_config.get_config("resolution=64,difficulty=easy")
  assert (easy.data.resolution, easy.data.difficulty, easy.model.max_length) == (64, "easy", 4096)
  assert not easy.data.generate and easy.data.split_seed == 0
  full = pathfinder_config.get_config("")
  assert (full.model.num_layers, full.model.emb_dim, full.model.num_heads) == (4, 32, 4)
  assert (full.model.qkv_dim, full.model.mlp_dim, full.model.pooling) == (16, 32, "mean")
  assert (full.batch_size, full.num_train_steps, full.optimizer.warmup_steps) == (512, 62_400, 312)
  pathx = pathx_config.get_config("")
  assert pathx.model.max_length == 16_384 and pathx.data.resolution == 128
  assert (pathx.model.num_layers, pathx.model.num_heads, pathx.optimizer.grad_clip_norm) == (
    1,
    2,
    1.0,
  )
  assert (pathx.batch_size, pathx.num_train_steps, pathx.optimizer.warmup_steps) == (
    64,
    500_000,
    2_500,
  )
  assert pathx_config.get_config("smoke").model.max_length == 1024
  linformer = pathx_config.get_config("attention=linformer")
  assert linformer.model.attention_kwargs.max_length == 16_384
  with pytest.raises(AttributeError):
    full.data.resolutoin = 64  # Locked: a misspelt key is an error.


def test_trains_two_steps_through_train_and_evaluate(tmp_path):
  from efficient_transformers.training import train_and_evaluate

  write_set(tmp_path / "data", {"0": 40, "1": 40})  # 64 / 8 / 8.
  if "pathfinder" not in tasks.available():
    tasks.register("pathfinder")(pathfinder.load_task)
  c = pathfinder_config.get_config("smoke,attention=softmax")
  c.data_dir = str(tmp_path / "data")
  c.data.generate = False
  c.data.num_workers = 1
  helpers.shrink(c)
  workdir = str(tmp_path / "run")
  final = train_and_evaluate(c, workdir)
  assert np.isfinite(final["loss"]) and 0.0 <= final["accuracy"] <= 1.0
  assert final["num_examples"] == 8  # Every validation example once.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
  assert os.path.exists(
    os.path.join(c.data_dir, "pathfinder32", "curv_contour_length_14", pathfinder.CACHE_PIXELS)
  )
