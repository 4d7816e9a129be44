"""ListOps: generated labels, bounds, determinism, the release format, errors.

Labels are checked against an evaluator written here from the written form
alone (a recursive-descent parser of `( A B )` pairs), sharing no code with
the generator.
"""

import dataclasses
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest

from efficient_transformers import interruptions
from efficient_transformers.data import listops
from efficient_transformers.errors import ConfigError, DataError

SMALL = dict(num_train=200, num_val=50, num_test=50, min_length=5, max_length=60, max_depth=4)


def parse(tokens: list[str], i: int = 0):
  """Parses `( A B )` pairs into nested 2-tuples; returns (tree, next index)."""
  if tokens[i] == "(":
    left, i = parse(tokens, i + 1)
    right, i = parse(tokens, i)
    assert tokens[i] == ")", f"expected ) at token {i}"
    return (left, right), i + 1
  assert tokens[i] != ")", f"unexpected ) at token {i}"
  return tokens[i], i + 1


def evaluate(tree) -> int | tuple:
  """The value of a parsed expression; operators accumulate arguments until `]`."""
  if isinstance(tree, str):
    return int(tree) if tree.isdigit() else tree
  left, right = evaluate(tree[0]), evaluate(tree[1])
  if isinstance(left, str):  # `( [OP x )`: an operator takes its first argument.
    return (left, [right])
  op, args = left
  if right != "]":
    return (op, args + [right])
  functions = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda a: int(statistics.median(a)),
    "[SM": lambda a: sum(a) % 10,
  }
  return functions[op](args)


def evaluate_line(source: str) -> int:
  tokens = source.split(" ")
  tree, end = parse(tokens)
  assert end == len(tokens)
  value = evaluate(tree)
  assert isinstance(value, int)
  return value


def read_rows(path: str) -> list[tuple[str, int]]:
  with open(path, encoding="ascii") as f:
    lines = f.read().split("\n")
  assert lines[0] == "Source\tTarget" and lines[-1] == ""
  return [(source, int(target)) for source, target in (line.split("\t") for line in lines[1:-1])]


def num_tokens(source: str) -> int:
  return len([t for t in source.split() if t not in "()"])


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("listops") / "small")
  listops.ensure_data(data_dir, seed=0, num_workers=1, **SMALL)
  return data_dir


def test_evaluator_on_hand_examples():
  assert evaluate_line("( ( ( [MAX 2 ) 9 ) ] )") == 9
  assert evaluate_line("( ( ( ( ( [MED 1 ) 2 ) 3 ) 4 ) ] )") == 2  # Median 2.5, rounded down.
  assert evaluate_line("( ( ( ( [SM 3 ) ( ( ( [MIN 4 ) 1 ) ] ) ) 9 ) ] )") == 3


def test_labels_match_independent_evaluation(small_dir):
  for split in listops.SPLITS:
    for source, target in read_rows(listops.split_path(small_dir, split)):
      assert evaluate_line(source) == target, source


def test_split_sizes_bounds_and_no_duplicates(small_dir):
  sources = []
  for split, size in zip(listops.SPLITS, (200, 50, 50), strict=True):
    rows = read_rows(listops.split_path(small_dir, split))
    assert len(rows) == size
    lengths = [num_tokens(source) for source, _ in rows]
    assert 5 < min(lengths) and max(lengths) < 60
    sources += [source for source, _ in rows]
  assert len(set(sources)) == len(sources)


def test_default_parameters_make_lra_trees(tmp_path):
  listops.generate(str(tmp_path), seed=3, num_workers=1, num_train=5, num_val=2, num_test=2)
  rows = sum((read_rows(listops.split_path(str(tmp_path), s)) for s in listops.SPLITS), [])
  assert len(rows) == 9
  for source, target in rows:
    assert 500 < num_tokens(source) < 2000
    assert evaluate_line(source) == target


def test_acceptance_rate_and_length_match_lra(tmp_path):
  # LRA_REFERENCE.md: about 8% of draws accepted, mean accepted length ~1,040.
  stats = listops.generate(str(tmp_path), num_workers=1, num_train=500, num_val=0, num_test=0)
  assert 0.06 < stats.num_accepted / stats.num_draws < 0.10
  assert 950 < stats.mean_accepted_length < 1130


def _files(data_dir: str) -> list[bytes]:
  return [open(listops.split_path(data_dir, s), "rb").read() for s in listops.SPLITS]


def test_same_seed_same_bytes_different_seed_differs(tmp_path, small_dir):
  listops.generate(str(tmp_path / "again"), seed=0, num_workers=1, **SMALL)
  listops.generate(str(tmp_path / "other"), seed=1, num_workers=1, **SMALL)
  assert _files(str(tmp_path / "again")) == _files(small_dir)
  assert _files(str(tmp_path / "other"))[0] != _files(small_dir)[0]


def test_worker_count_does_not_change_output(tmp_path):
  params = dict(num_train=600, num_val=50, num_test=50, min_length=30, max_length=100, max_depth=5)
  one = listops.generate(str(tmp_path / "one"), seed=5, num_workers=1, **params)
  two = listops.generate(str(tmp_path / "two"), seed=5, num_workers=2, **params)
  assert one.num_draws >= 4 * 1024  # Several chunks, so the order of results matters.
  assert _files(str(tmp_path / "one")) == _files(str(tmp_path / "two"))
  assert not [f for f in os.listdir(tmp_path / "two") if ".tmp" in f]
  assert dataclasses.replace(two, seconds=one.seconds) == one


def test_existing_data_is_read_not_regenerated(small_dir):
  paths = [listops.split_path(small_dir, s) for s in listops.SPLITS]
  before = [(os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths]
  listops.ensure_data(small_dir, seed=7, **SMALL)  # Another seed: must not matter.
  assert [(os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths] == before


def test_partial_data_dir_is_an_error(tmp_path):
  (tmp_path / "basic_train.tsv").write_text("Source\tTarget\n")
  with pytest.raises(DataError, match="basic_val.tsv.*basic_test.tsv"):
    listops.ensure_data(str(tmp_path), **SMALL)


def test_vocabulary_is_fixed():
  assert listops.VOCAB[:6] == ("<pad>", "[MIN", "[MAX", "[MED", "[SM", "]")
  assert [listops.VOCAB.index(str(d)) for d in (0, 9)] == [6, 15]
  assert listops.PAD_ID == 0 and listops.CLS_ID == 16 and listops.VOCAB_SIZE == 17


def write_release_file(data_dir, split: str, rows: list[str], newline: str = "\n") -> str:
  os.makedirs(data_dir, exist_ok=True)
  path = listops.split_path(str(data_dir), split)
  with open(path, "w", newline="") as f:
    f.write(newline.join(["Source\tTarget", *rows]) + newline)
  return path


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_release_format_reads_to_expected_ids(tmp_path, newline):
  rows = ["( ( ( [MAX 2 ) 9 ) ] )\t9", "( ( ( ( [SM 3 ) ( ( ( [MIN 4 ) 1 ) ] ) ) 9 ) ] )\t3"]
  write_release_file(tmp_path, "val", rows, newline)
  data = listops.load_split(str(tmp_path), "val", max_length=10)
  max_, sm, min_, close = 2, 4, 1, 5
  digit = {d: 6 + d for d in range(10)}
  assert data["inputs"].dtype == np.int32 and data["targets"].dtype == np.int32
  np.testing.assert_array_equal(
    data["inputs"],
    [
      [max_, digit[2], digit[9], close, 0, 0, 0, 0, 0, 0],
      [sm, digit[3], min_, digit[4], digit[1], close, digit[9], close, 0, 0],
    ],
  )
  np.testing.assert_array_equal(data["targets"], [9, 3])


def test_reader_agrees_with_written_tokens_and_truncates(small_dir):
  rows = read_rows(listops.split_path(small_dir, "train"))
  data = listops.load_split(small_dir, "train", max_length=64)
  for (source, target), ids, label in zip(rows, data["inputs"], data["targets"], strict=True):
    tokens = [t for t in source.split() if t not in "()"]
    np.testing.assert_array_equal(
      ids, [listops.VOCAB.index(t) for t in tokens] + [0] * (64 - len(tokens))
    )
    assert label == target
  short = listops.load_split(small_dir, "train", max_length=8)
  np.testing.assert_array_equal(short["inputs"], data["inputs"][:, :8])


@pytest.mark.parametrize(
  "bad_line, message",
  [
    ("( ( ( [MAX 2 ) 9 ) ] )", "expected 2 tab-separated columns"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t9\t1", "expected 2 tab-separated columns"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t12", "Target must be one digit"),
    ("( ( ( [MAX 2 ) 9 ) ] )\tx", "Target must be one digit"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t", "Target must be one digit"),
    ("( ( ( [FOO 2 ) 9 ) ] )\t9", "unknown token '\\[FOO'"),
    ("( ( ( [MAX 2 ) 19 ) ] )\t9", "unknown token '19'"),
    ("( ( ( [MAX(2 ) 9 ) ] )\t9", "unknown token '\\[MAX2'"),
    ("( ( ( [SMX 2 ) 9 ) ] )\t9", "unknown token '\\[SMX'"),
    ("( )\t9", "empty Source"),
  ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
  good = "( ( ( [MIN 2 ) 9 ) ] )\t2"
  path = write_release_file(tmp_path, "test", [good, bad_line, good])
  with pytest.raises(DataError, match=re.escape(f"{path}, line 3: ") + message):
    listops.load_split(str(tmp_path), "test", max_length=16)


def test_bad_header_is_an_error(tmp_path):
  path = listops.split_path(str(tmp_path), "train")
  with open(path, "w") as f:
    f.write("( ( ( [MAX 2 ) 9 ) ] )\t9\n")
  with pytest.raises(DataError, match=re.escape(f"{path}, line 1: expected the header")):
    listops.load_split(str(tmp_path), "train", max_length=16)


def test_missing_data_is_an_error_naming_the_command(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match=re.escape(missing) + " does not exist.*--data_dir="):
    listops.load_split(missing, "train", max_length=16)
  with pytest.raises(DataError, match="basic_test.tsv is missing.*python -m"):
    listops.load_split(str(tmp_path), "test", max_length=16)


def test_interrupted_generation_leaves_no_files(tmp_path, monkeypatch):
  draw = listops._draw_chunk

  def draw_then_fail(seed, chunk_index, p):
    if chunk_index == 2:
      raise KeyboardInterrupt
    return draw(seed, chunk_index, p)

  monkeypatch.setattr(listops, "_draw_chunk", draw_then_fail)
  params = dict(SMALL, num_train=2000)
  with pytest.raises(KeyboardInterrupt):
    listops.ensure_data(str(tmp_path), num_workers=1, **params)
  assert os.listdir(tmp_path) == []


def test_bad_generator_parameters_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="max_lenght"):
    listops.generate(str(tmp_path), max_lenght=10)
  with pytest.raises(ConfigError, match="strictly between"):
    listops.generate(str(tmp_path), min_length=10, max_length=11)


def test_command_line_generates_the_smoke_set(tmp_path):
  data_dir = str(tmp_path / "smoke")
  assert listops.main([f"--data_dir={data_dir}", "--smoke", "--num_workers=1"]) == 0
  data = listops.load_split(data_dir, "val", max_length=64)
  assert data["inputs"].shape == (500, 64)
  assert ((data["inputs"] != 0).sum(axis=1) > 10).all()


def dead_pid() -> int:
  """The pid of a process of this host that has ended and been reaped."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_rerun_removes_what_killed_runs_left_and_keeps_live_runs_files(tmp_path, small_dir):
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  dead, host = dead_pid(), interruptions._HOST
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  # Killed while writing: temporary files of a dead process, in the new and the old form.
  stale = [f"basic_train.tsv.tmp-{host}-{dead}", f"basic_val.tsv.tmp-{dead}"]
  # A live process's, another host's, and a file that is not ours.
  kept = [f"basic_test.tsv.tmp-{host}-{live.pid}", f"basic_test.tsv.tmp-otherhost-{dead}"]
  kept.append(f"notes.txt.tmp-{host}-{dead}")
  for name in stale + kept:
    open(os.path.join(data_dir, name), "w").close()
  try:
    listops.ensure_data(data_dir, seed=0, num_workers=1, **SMALL)
  finally:
    live.kill()
    live.wait()
  assert sorted(os.listdir(data_dir)) == sorted(kept + [f"basic_{s}.tsv" for s in listops.SPLITS])
  assert _files(data_dir) == _files(small_dir)


def test_run_killed_while_renaming_is_redone(tmp_path, small_dir):
  # Killed between two renames: the marker, one new file, one old one, one missing.
  data_dir = str(tmp_path)
  write_release_file(tmp_path, "val", ["( ( ( [MAX 2 ) 9 ) ] )\t9"])
  with open(listops.split_path(data_dir, "train"), "wb") as f:
    f.write(_files(small_dir)[0])
  open(
    os.path.join(data_dir, f".listops-renaming.tmp-{interruptions._HOST}-{dead_pid()}"), "w"
  ).close()
  listops.ensure_data(data_dir, seed=0, num_workers=1, **SMALL)
  assert sorted(os.listdir(data_dir)) == [f"basic_{s}.tsv" for s in ("test", "train", "val")]
  assert _files(data_dir) == _files(small_dir)


CLI = [sys.executable, "-m", "efficient_transformers.data.listops", "--num_workers=1"]
TINY = ["--num_train=20", "--num_val=5", "--num_test=5", "--min_length=5", "--max_length=60"]
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
  env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=REPO)
  done = subprocess.run(
    CLI + TINY + [flag.format(tmp=tmp_path)],
    cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr
  assert [
    len(read_rows(listops.split_path(str(tmp_path / lands_in), s))) for s in listops.SPLITS
  ] == [
    20,
    5,
    5,
  ]


@pytest.mark.parametrize(
  "data_dir, message",
  [
    ("{tmp}/a_file", "error: --data_dir={tmp}/a_file is a file, not a directory"),
    ("{tmp}/a_file/sub/", "error: {tmp}/a_file/sub is inside a file, not a directory"),
    (
      "gs://bucket/listops",
      "error: --data_dir='gs://bucket/listops': this path must be on a local",
    ),
  ],
)
def test_command_line_bad_data_dir_is_one_error_line(data_dir, message, tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  data_dir, message = data_dir.format(tmp=tmp_path), message.format(tmp=tmp_path)
  assert listops.main([f"--data_dir={data_dir}", "--num_workers=1", *TINY]) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1, err
  with pytest.raises(DataError, match="is a file, not a directory"):
    listops.ensure_data(str(tmp_path / "a_file"), num_workers=1, **SMALL)
