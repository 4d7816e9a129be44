"""LRA Retrieval: the release's TSV format, its errors, the synthetic smoke set, training."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.lra import retrieval as retrieval_config
from efficient_transformers.data import retrieval, tasks
from efficient_transformers.errors import ConfigError, DataError
from efficient_transformers.training import train_and_evaluate
from tests import helpers

TRAIN, EVAL, TEST = "new_aan_pairs.train.tsv", "new_aan_pairs.eval.tsv", "new_aan_pairs.test.tsv"


def write(path, lines: list[str], *, newline: str = "\n", final_newline: bool = True) -> str:
  text = newline.join(lines) + (newline if final_newline else "")
  with open(path, "wb") as f:
    f.write(text.encode("utf-8"))
  return str(path)


def tokens(text: str, width: int) -> list[int]:
  """The expected row: UTF-8 bytes + 1, cut to `width`, padded with 0."""
  ids = [b + 1 for b in text.encode("utf-8")][:width]
  return ids + [0] * (width - len(ids))


def pair_lines(num: int, *, width: int = 8, seed: int = 0) -> list[str]:
  """`num` release-format rows of random ASCII documents, labels alternating."""
  rng = np.random.default_rng(seed)
  lines = []
  for i in range(num):
    docs = [
      "".join(chr(c) for c in rng.integers(97, 123, rng.integers(1, 2 * width))) for _ in "ab"
    ]
    lines.append(f"{i % 2}\tp{i}a\tp{i}b\t{docs[0]}\t{docs[1]}")
  return lines


def test_reader_on_the_release_format(tmp_path):
  long_doc = "x" * 30 + "TAIL"  # Longer than max_length: the tail must be cut.
  rows = [
    ("1.0", "A", "B", 'naïve "hi"', "short"),  # Float label, quotes, multibyte.
    ("0", "C", "D", long_doc, "é"),
    ("0.0", "E", "F", "", "ab"),  # An empty document is all padding.
    ("1", "G", "H", "same", "same"),
  ]
  write(tmp_path / TEST, ["\t".join(r) for r in rows])
  out = retrieval.load_split(str(tmp_path), "test", max_length=16)
  assert set(out) == {"inputs1", "inputs2", "targets"}
  assert out["inputs1"].dtype == np.int16 and out["inputs1"].shape == (4, 16)
  assert out["inputs2"].dtype == np.int16 and out["inputs2"].shape == (4, 16)
  assert out["targets"].dtype == np.int32
  assert out["targets"].tolist() == [1, 0, 0, 1]
  for i, (_, _, _, text1, text2) in enumerate(rows):
    assert out["inputs1"][i].tolist() == tokens(text1, 16), i
    assert out["inputs2"][i].tolist() == tokens(text2, 16), i
  # "ï" is two bytes, 0xC3 0xAF: tokens 0xC4, 0xB0.
  assert out["inputs1"][0, :7].tolist() == [ord("n") + 1, ord("a") + 1, 0xC4, 0xB0, 119, 102, 33]
  assert out["inputs1"][0, 7] == ord('"') + 1  # Quotes are plain bytes.
  assert out["inputs1"][1].tolist() == [ord("x") + 1] * 16  # Cut: no "TAIL".
  assert out["inputs2"][3, 4:].tolist() == [0] * 12  # Padded.


def test_reader_accepts_crlf_no_final_newline_and_many_blocks(tmp_path, monkeypatch):
  lines = pair_lines(50)
  os.makedirs(tmp_path / "a")
  os.makedirs(tmp_path / "b")
  write(tmp_path / "a" / TRAIN, lines)
  write(tmp_path / "b" / TRAIN, lines, newline="\r\n", final_newline=False)
  monkeypatch.setattr(retrieval, "_BLOCK_BYTES", 64)  # Blocks of a few lines, lines split.
  a = retrieval.load_split(str(tmp_path / "a"), "train", max_length=12)
  b = retrieval.load_split(str(tmp_path / "b"), "train", max_length=12)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  for i, line in enumerate(lines):
    label, _, _, text1, text2 = line.split("\t")
    assert a["targets"][i] == int(label)
    assert a["inputs1"][i].tolist() == tokens(text1, 12)
    assert a["inputs2"][i].tolist() == tokens(text2, 12)


def test_missing_column_names_file_and_line(tmp_path):
  lines = pair_lines(5)
  lines[3] = "1\tX\tY\tonly one text"
  path = write(tmp_path / EVAL, lines)
  with pytest.raises(DataError) as e:
    retrieval.load_split(str(tmp_path), "validation", max_length=8)
  message = str(e.value)
  assert f"{path}, line 4" in message and "expected 5 tab-separated columns" in message
  assert "got 4" in message


def test_bad_label_names_file_line_and_value(tmp_path):
  lines = pair_lines(5)
  lines[2] = "\t".join(["2.5"] + lines[2].split("\t")[1:])
  path = write(tmp_path / TRAIN, lines)
  with pytest.raises(DataError) as e:
    retrieval.load_split(str(tmp_path), "train", max_length=8)
  assert f"{path}, line 3" in str(e.value) and "'2.5'" in str(e.value)
  assert "label must be 0 or 1" in str(e.value)


def _config(data_dir, arg: str = "smoke,attention=softmax"):
  c = retrieval_config.get_config(arg)
  c.data_dir = str(data_dir)
  return c


def test_missing_files_name_paths_and_the_release(tmp_path):
  write(tmp_path / TRAIN, pair_lines(3))
  config = _config(tmp_path, "attention=softmax")  # The AAN config: data cannot be generated.
  with pytest.raises(DataError) as e:
    retrieval.load_task(config, generate=True)
  message = str(e.value)
  assert str(tmp_path / EVAL) in message and str(tmp_path / TEST) in message
  assert str(tmp_path / TRAIN) not in message
  assert "lra_release.gz" in message and "lra_release/tsv_data/" in message
  assert "google-research/long-range-arena" in message and f"into {tmp_path}" in message
  assert not (tmp_path / EVAL).exists()  # Nothing synthetic was written in place of AAN.

  smoke = _config(tmp_path / "empty")
  with pytest.raises(DataError, match="--make_smoke_data --data_dir="):
    retrieval.load_task(smoke, generate=False)  # As evaluation asks: no generating.


def test_data_longer_than_the_model_is_a_config_error(tmp_path):
  config = _config(tmp_path)
  config.data.max_length = config.model.max_length + 1
  with pytest.raises(ConfigError, match="config.data.max_length"):
    retrieval.load_task(config, generate=True)


def test_synthetic_smoke_set_is_seeded_balanced_and_readable(tmp_path):
  sizes = dict(num_train=41, num_val=10, num_test=9, max_length=32)
  retrieval.make_smoke_data(str(tmp_path / "a"), seed=3, **sizes)
  retrieval.make_smoke_data(str(tmp_path / "b"), seed=3, **sizes)
  retrieval.make_smoke_data(str(tmp_path / "c"), seed=4, **sizes)
  for name in (TRAIN, EVAL, TEST):
    a = (tmp_path / "a" / name).read_bytes()
    assert a == (tmp_path / "b" / name).read_bytes()
    assert a != (tmp_path / "c" / name).read_bytes()
  for split, num in (("train", 41), ("validation", 10), ("test", 9)):
    out = retrieval.load_split(str(tmp_path / "a"), split, max_length=32)
    assert out["targets"].size == num and out["targets"].sum() == num // 2
    lengths = (out["inputs1"] != 0).sum(axis=1)
    assert lengths.max() == 32 and lengths.min() < 32  # Some cut, some padded.
  # Label 1 pairs share a topic: the same upper-case letters.
  rows = [line.split("\t") for line in (tmp_path / "a" / TRAIN).read_text().splitlines()]
  for label, _, _, text1, text2 in rows:
    caps1, caps2 = ({c for c in t if c.isupper()} for t in (text1, text2))
    if caps1 and caps2:
      assert (label == "1") == bool(caps1 & caps2), (label, text1, text2)


def test_make_smoke_data_command_line(tmp_path):
  assert retrieval.main(["--make_smoke_data", f"--data_dir={tmp_path}", "--max_length=16"]) == 0
  assert sorted(os.listdir(tmp_path)) == sorted([EVAL, TEST, TRAIN])
  assert retrieval.main([f"--data_dir={tmp_path / 'nothing'}"]) == 2


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "flag, lands_in",
  [
    ("--data_dir=rel/dir/", "rel/dir"),  # Relative to the working directory, trailing slash.
    ("--data_dir={tmp}/abs", "abs"),
    ("--data_dir=~/link/", "real"),  # ~ and a symlink to a directory.
  ],
)
def test_command_line_data_dir_as_users_write_it(flag, lands_in, tmp_path):
  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real")
  base = [sys.executable, "-m", "efficient_transformers.data.retrieval", flag.format(tmp=tmp_path)]
  env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=REPO)
  for extra in (["--make_smoke_data", "--max_length=16"], ["--max_length=16"]):  # Write, read.
    done = subprocess.run(
      base + extra, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
  assert sorted(os.listdir(tmp_path / lands_in)) == sorted([EVAL, TEST, TRAIN])
  assert done.stdout.count(" pairs, ") == 3  # One line per file read.


@pytest.mark.parametrize(
  "data_dir, message",
  [
    ("{tmp}/a_file", "error: --data_dir={tmp}/a_file is a file, not a directory"),
    ("{tmp}/a_file/sub/", "error: {tmp}/a_file/sub is inside a file, not a directory"),
    ("gs://bucket/aan", "error: --data_dir='gs://bucket/aan': this path must be on a local"),
  ],
)
def test_command_line_bad_data_dir_is_one_error_line(data_dir, message, tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  data_dir, message = data_dir.format(tmp=tmp_path), message.format(tmp=tmp_path)
  assert retrieval.main([f"--data_dir={data_dir}", "--make_smoke_data", "--max_length=16"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1, err


def test_config_settings():
  c = retrieval_config.get_config()
  assert c.model.kind == "dual_encoder" and c.model.pooling == "cls"
  assert (c.model.num_layers, c.model.emb_dim, c.model.num_heads) == (4, 128, 4)
  assert (c.model.qkv_dim, c.model.mlp_dim, c.model.max_length) == (128, 512, 4000)
  assert c.data.max_length == c.model.max_length and not c.data.synthetic
  assert c.optimizer.warmup_steps < c.num_train_steps == 5000  # The original's 8000 was longer.
  smoke = retrieval_config.get_config("smoke,attention=local")
  assert smoke.data.synthetic and smoke.data_dir != c.data_dir
  assert smoke.data.max_length == smoke.model.max_length == 256
  with pytest.raises(ConfigError, match="Valid: attention, smoke"):
    retrieval_config.get_config("length=8")


def test_trains_two_steps_as_a_dual_encoder(tmp_path):
  data_dir = tmp_path / "data"
  os.makedirs(data_dir)
  write(data_dir / TRAIN, pair_lines(24, width=20, seed=1))
  write(data_dir / EVAL, pair_lines(10, width=20, seed=2))
  write(data_dir / TEST, pair_lines(10, width=20, seed=3))
  if "retrieval" not in tasks.available():
    tasks.register("retrieval")(retrieval.load_task)
  c = _config(data_dir)
  assert c.model.kind == "dual_encoder"
  c.data.generate = False  # Read the fixture; never write smoke data over it.
  c.data.max_length = c.model.max_length = 32
  helpers.shrink(c)
  workdir = str(tmp_path / "run")
  final = train_and_evaluate(c, workdir)
  assert math.isfinite(final["loss"]) and 0.0 <= final["accuracy"] <= 1.0
  assert final["num_examples"] == 10
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
  assert all(math.isfinite(r["loss"]) for r in records)
