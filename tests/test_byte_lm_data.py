"""Byte-level LM data: file readers, the stdlib corpus, ordered stream batches."""

import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import zipfile

import ml_collections
import numpy as np
import pytest

from efficient_transformers import interruptions
from efficient_transformers.data import byte_corpus, byte_lm, pipeline
from efficient_transformers.errors import ConfigError, DataError

SMALL_CAP = 200_000
TINY = dataclasses.replace(byte_lm.ENWIK8, split_bytes=(900, 60, 40))


def _fixture_bytes(n: int = 1000) -> bytes:
  return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------- enwik8 / text8 readers.


@pytest.mark.parametrize("zipped", [False, True])
def test_file_reader_splits_are_exact(tmp_path, zipped):
  data = _fixture_bytes()
  if zipped:
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
      zf.writestr("enwik8", data)
  else:
    (tmp_path / "enwik8").write_bytes(data)
  bounds = {"train": (0, 900), "validation": (900, 960), "test": (960, 1000)}
  for split, (lo, hi) in bounds.items():
    got = byte_lm.read_file_split(str(tmp_path), TINY, split)
    assert got["tokens"].dtype == np.int16
    np.testing.assert_array_equal(got["tokens"], [b + 1 for b in data[lo:hi]])
    np.testing.assert_array_equal(np.flatnonzero(got["doc_start"]), [0])


def test_file_reader_prefers_raw_file_and_checks_its_size(tmp_path):
  (tmp_path / "enwik8").write_bytes(_fixture_bytes(999))
  with pytest.raises(DataError) as e:
    byte_lm.read_file_split(str(tmp_path), TINY, "train")
  assert str(tmp_path / "enwik8") in str(e.value)
  assert "999" in str(e.value) and "1,000" in str(e.value)
  assert "http://mattmahoney.net/dc/enwik8.zip" in str(e.value)


@pytest.mark.parametrize("problem", ["missing", "no_member", "not_a_zip", "wrong_size"])
def test_file_reader_bad_zip_names_file_and_url(tmp_path, problem):
  path = tmp_path / "enwik8.zip"
  if problem == "no_member":
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("enwik9", _fixture_bytes())
  elif problem == "not_a_zip":
    path.write_bytes(b"PK\x03\x04 this is not really a zip file" * 10)
  elif problem == "wrong_size":
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("enwik8", _fixture_bytes(1001))
  with pytest.raises(DataError) as e:
    byte_lm.read_file_split(str(tmp_path), TINY, "validation")
  assert str(path) in str(e.value)
  assert "http://mattmahoney.net/dc/enwik8.zip" in str(e.value)


def test_standard_splits_are_the_transformer_xl_byte_counts():
  for corpus in (byte_lm.ENWIK8, byte_lm.TEXT8):
    assert corpus.split_bytes == (90_000_000, 5_000_000, 5_000_000)
    assert corpus.url == f"http://mattmahoney.net/dc/{corpus.name}.zip"


# ---------------------------------------------------------------- The stdlib corpus.


def _expected_split_bytes(files: list[str], budget: int) -> tuple[bytes, list[int]]:
  """A naive rebuild from the files a split lists: contents, separators, starts."""
  root, out, starts = sysconfig.get_paths()["stdlib"], b"", []
  for rel in files:
    starts.append(len(out))
    with open(os.path.join(root, rel), "rb") as f:
      out += f.read() + b"\x00"
  return out[:budget], starts


def test_stdlib_corpus_is_deterministic_and_matches_its_files():
  splits, meta = byte_corpus.build_stdlib_corpus(max_bytes=SMALL_CAP, seed=3)
  again, meta_again = byte_corpus.build_stdlib_corpus(max_bytes=SMALL_CAP, seed=3)
  assert meta == meta_again
  budgets = {"train": SMALL_CAP - 20_000, "validation": 10_000, "test": 10_000}
  for split in byte_lm.SPLITS:
    np.testing.assert_array_equal(splits[split]["tokens"], again[split]["tokens"])
    raw, starts = _expected_split_bytes(meta["files"][split], budgets[split])
    assert len(raw) == budgets[split] == meta["num_bytes"][split]
    np.testing.assert_array_equal(splits[split]["tokens"], np.frombuffer(raw, np.uint8) + 1)
    assert meta["fingerprints"][split] == hashlib.sha256(raw).hexdigest()
    # doc_start marks each file's first byte, right after the previous file's separator.
    np.testing.assert_array_equal(np.flatnonzero(splits[split]["doc_start"]), starts)
    assert all(raw[s - 1] == 0 for s in starts[1:])
  assert meta["python_version"] == platform.python_version()


def test_stdlib_split_is_by_file_and_stable_when_the_cap_changes():
  _, small = byte_corpus.build_stdlib_corpus(max_bytes=SMALL_CAP, seed=0)
  big_splits, big = byte_corpus.build_stdlib_corpus(max_bytes=2 * SMALL_CAP, seed=0)
  small_splits, _ = byte_corpus.build_stdlib_corpus(max_bytes=SMALL_CAP, seed=0)
  seen: dict[str, str] = {}
  for split in byte_lm.SPLITS:
    for rel in big["files"][split]:
      assert seen.setdefault(rel, split) == split, f"{rel} is in two splits"
      assert byte_corpus.file_split(rel, 0) == split
      assert "/test/" not in f"/{rel}" and "/tests/" not in f"/{rel}"
      assert "site-packages" not in rel and "__pycache__" not in rel
    assert big["files"][split] == sorted(big["files"][split])  # Ordered by relative path.
    n = len(small["files"][split])
    assert big["files"][split][:n] == small["files"][split]  # A bigger cap only adds files.
    np.testing.assert_array_equal(
      big_splits[split]["tokens"][: small["num_bytes"][split]], small_splits[split]["tokens"]
    )
  # The key matters: another seed moves some files.
  files = byte_corpus.stdlib_sources()
  assert any(byte_corpus.file_split(f, 0) != byte_corpus.file_split(f, 1) for f in files[:100])
  fractions = [
    sum(byte_corpus.file_split(f, 0) == s for f in files) / len(files) for s in byte_lm.SPLITS
  ]
  np.testing.assert_allclose(fractions, [0.9, 0.05, 0.05], atol=0.04)


def test_stdlib_corpus_cache_is_built_reused_and_rebuilt(tmp_path):
  data_dir = str(tmp_path)
  with pytest.raises(DataError, match="byte_lm --data_dir"):
    byte_corpus.load_stdlib_corpus(data_dir, max_bytes=SMALL_CAP, generate=False)
  built, meta = byte_corpus.load_stdlib_corpus(data_dir, max_bytes=SMALL_CAP)
  folder = byte_corpus.cache_dir(
    data_dir, max_bytes=SMALL_CAP, seed=0, fractions=byte_corpus.DEFAULT_FRACTIONS
  )
  assert sorted(os.listdir(folder)) == sorted(
    ["meta.json"] + [f"{s}_{f}.npy" for s in byte_lm.SPLITS for f in ("tokens", "doc_start")]
  )
  cached, meta_cached = byte_corpus.load_stdlib_corpus(
    data_dir, max_bytes=SMALL_CAP, generate=False
  )
  assert meta_cached == json.loads(json.dumps(meta))
  os.remove(os.path.join(folder, "test_tokens.npy"))
  rebuilt, _ = byte_corpus.load_stdlib_corpus(data_dir, max_bytes=SMALL_CAP)
  # A damaged (but loadable) file fails its fingerprint and is rebuilt too.
  np.save(os.path.join(folder, "train_tokens.npy"), built["train"]["tokens"][::-1])
  repaired, _ = byte_corpus.load_stdlib_corpus(data_dir, max_bytes=SMALL_CAP)
  for split in byte_lm.SPLITS:
    for field in ("tokens", "doc_start"):
      np.testing.assert_array_equal(cached[split][field], built[split][field])
      np.testing.assert_array_equal(rebuilt[split][field], built[split][field])
      np.testing.assert_array_equal(repaired[split][field], built[split][field])


def test_killed_build_is_not_trusted_and_its_temporary_files_are_removed(tmp_path):
  data_dir = str(tmp_path)
  folder = byte_corpus.cache_dir(
    data_dir, max_bytes=SMALL_CAP, seed=0, fractions=byte_corpus.DEFAULT_FRACTIONS
  )
  os.makedirs(folder)
  # As a build killed before meta.json: one file done, one half-written.
  np.save(os.path.join(folder, "train_tokens.npy"), np.ones(10, np.int16))
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  host = interruptions._HOST
  stale = f"test_tokens.npy.tmp-{host}-{dead.pid}"
  in_use = [f"meta.json.tmp-{host}-{live.pid}", f"meta.json.tmp-otherhost-{dead.pid}"]
  for name in [stale, *in_use]:
    with open(os.path.join(folder, name), "wb") as f:
      f.write(b"\x93NUMPY partial")
  try:
    with pytest.raises(DataError, match="No stdlib corpus cache"):
      byte_corpus.load_stdlib_corpus(data_dir, max_bytes=SMALL_CAP, generate=False)
    built, meta = byte_corpus.load_stdlib_corpus(data_dir, max_bytes=SMALL_CAP)
  finally:
    live.kill()
    live.wait()
  assert sorted(os.listdir(folder)) == sorted(
    ["meta.json", *in_use]
    + [f"{s}_{f}.npy" for s in byte_lm.SPLITS for f in ("tokens", "doc_start")]
  )
  assert meta["num_bytes"]["train"] == built["train"]["tokens"].size > 10
  again, _ = byte_corpus.load_stdlib_corpus(data_dir, max_bytes=SMALL_CAP, generate=False)
  np.testing.assert_array_equal(again["train"]["tokens"], built["train"]["tokens"])


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
  done = subprocess.run(
    [sys.executable, "-m", "efficient_transformers.data.byte_lm", flag.format(tmp=tmp_path),
     f"--max_bytes={SMALL_CAP}"],
    cwd=tmp_path, env=dict(os.environ, HOME=str(tmp_path), PYTHONPATH=REPO),
    capture_output=True, text=True, check=False,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout)["num_bytes"]["train"] > 0
  folder = byte_corpus.cache_dir(
    str(tmp_path / lands_in), max_bytes=SMALL_CAP, seed=0, fractions=byte_corpus.DEFAULT_FRACTIONS
  )
  assert "meta.json" in os.listdir(folder)


@pytest.mark.parametrize(
  "data_dir, message",
  [
    ("{tmp}/a_file", "error: --data_dir={tmp}/a_file is a file, not a directory"),
    ("{tmp}/a_file/sub/", "error: {tmp}/a_file/sub/stdlib-py"),
    ("gs://bucket/lm", "error: --data_dir='gs://bucket/lm': this path must be on a local"),
  ],
)
def test_command_line_bad_data_dir_is_one_error_line(data_dir, message, tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  data_dir, message = data_dir.format(tmp=tmp_path), message.format(tmp=tmp_path)
  assert byte_lm.main([f"--data_dir={data_dir}", f"--max_bytes={SMALL_CAP}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1, err
  with pytest.raises(DataError, match="is a file, not a directory"):
    byte_corpus.load_stdlib_corpus(str(tmp_path / "a_file"), max_bytes=SMALL_CAP)


def test_unigram_entropy_and_bits_per_byte_hand_computed():
  tokens = lambda s: byte_corpus.bytes_to_tokens(s.encode())
  assert byte_lm.unigram_entropy_bits(tokens("aabb")) == pytest.approx(1.0)
  assert byte_lm.unigram_entropy_bits(tokens("aaab")) == pytest.approx(
    -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
  )
  assert byte_lm.unigram_entropy_bits(tokens("zzzz")) == pytest.approx(0.0)
  assert byte_lm.unigram_entropy_bits(tokens("abcdefgh")) == pytest.approx(3.0)
  assert byte_lm.bits_per_byte(math.log(2)) == pytest.approx(1.0)
  np.testing.assert_allclose(byte_lm.bits_per_byte(np.log([256.0, 4.0])), [8.0, 2.0])


# ---------------------------------------------------------------- Stream batches.

N, B, SEG = 203, 4, 5  # Streams of 50 tokens: 9 segments of 5 inputs per epoch.


def _positions(n: int = N) -> np.ndarray:
  return np.arange(1, n + 1, dtype=np.int16)  # Token value = 1 + position: traceable.


def test_stream_iterator_continues_each_row_and_wraps():
  tokens = _positions()
  it = pipeline.stream_train_iterator(tokens, global_batch_size=B, segment_length=SEG)
  assert (N // B - 1) // SEG == 9  # Steps per epoch.
  batches = [next(it) for _ in range(2 * 9 + 1)]
  stream = N // B
  for t, batch in enumerate(batches):
    assert batch["inputs"].shape == batch["targets"].shape == (B, SEG)
    assert batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["reset"], np.full(B, t % 9 == 0))
    step = t % 9
    for r in range(B):  # Against the raw stream: row r holds tokens [r*n, (r+1)*n).
      lo = r * stream + step * SEG
      np.testing.assert_array_equal(batch["inputs"][r], tokens[lo : lo + SEG])
      np.testing.assert_array_equal(batch["targets"][r], tokens[lo + 1 : lo + SEG + 1])
    if step:  # Continues exactly where the previous step ended.
      np.testing.assert_array_equal(batch["inputs"][:, 0], batches[t - 1]["targets"][:, -1])
  np.testing.assert_array_equal(batches[9]["inputs"], batches[0]["inputs"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_stream_process_shards_partition_the_global_batch(process_count):
  tokens = _positions()
  whole = pipeline.stream_train_iterator(tokens, global_batch_size=B, segment_length=SEG)
  shards = [
    pipeline.stream_train_iterator(
      tokens, global_batch_size=B, segment_length=SEG, process_index=p, process_count=process_count
    )
    for p in range(process_count)
  ]
  for _ in range(12):
    expected = next(whole)
    parts = [next(s) for s in shards]
    for key in ("inputs", "targets", "reset"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
  with pytest.raises(ConfigError, match="multiple"):
    pipeline.stream_train_iterator(tokens, global_batch_size=B, segment_length=SEG, process_count=3)


@pytest.mark.parametrize("steps_before", [0, 4, 8, 13])
def test_stream_state_resumes_the_identical_next_batch(steps_before):
  tokens = _positions()
  it = pipeline.stream_train_iterator(tokens, global_batch_size=B, segment_length=SEG)
  for _ in range(steps_before):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = pipeline.stream_train_iterator(
    tokens, global_batch_size=B, segment_length=SEG, process_index=1, process_count=2
  )
  resumed.set_state(state)
  for _ in range(6):  # Crosses the epoch boundary for the later starts.
    expected, got = next(it), next(resumed)
    for key in ("inputs", "targets", "reset"):
      np.testing.assert_array_equal(got[key], expected[key][B // 2 :])
  assert resumed.get_state() == it.get_state()


def test_stream_too_short_or_malformed_is_refused_by_name():
  tokens = _positions()
  with pytest.raises(DataError, match="need at least"):
    pipeline.stream_train_iterator(tokens[:20], global_batch_size=B, segment_length=SEG)
  with pytest.raises(DataError, match="1-D"):
    pipeline.stream_train_iterator(tokens.reshape(7, 29), global_batch_size=B, segment_length=SEG)
  with pytest.raises(ConfigError, match="segment length"):
    pipeline.stream_eval_batches(tokens, global_batch_size=B, segment_length=0)


def test_stream_batching_declares_its_layout_for_the_resume_check():
  # A resume compares this (train_lib's data order): the iterator position alone would
  # silently continue another layout.
  split = {"tokens": _positions()}
  assert pipeline.Streams(8, 4).order(split) == {"segment_length": 8, "num_tokens": N}
  assert pipeline.Streams(8, 4).order(split) != pipeline.Streams(16, 4).order(split)
  assert pipeline.EXAMPLES.order({"inputs": np.zeros((3, 2))}) == {}


@pytest.mark.parametrize(
  ("n", "batch", "seg", "procs"), [(203, 4, 5, 1), (97, 4, 6, 2), (9, 4, 3, 4)]
)
def test_stream_eval_covers_every_token_once(n, batch, seg, procs):
  tokens = _positions(n)
  shards = [
    pipeline.stream_eval_batches(
      tokens, global_batch_size=batch, segment_length=seg, process_index=p, process_count=procs
    )
    for p in range(procs)
  ]
  steps = [list(s) for s in shards]
  assert len({len(s) for s in steps}) == 1  # The same number of steps on every process.
  targets, inputs = [], []
  for t in range(len(steps[0])):
    merged = {k: np.concatenate([s[t][k] for s in steps]) for k in ("inputs", "targets", "reset")}
    assert merged["inputs"].shape == (batch, seg)
    np.testing.assert_array_equal(merged["reset"], np.full(batch, t == 0))
    real = merged["targets"] != byte_lm.PAD_ID
    # Each real target is the token right after its input; padding is 0 in both.
    np.testing.assert_array_equal(merged["targets"][real], merged["inputs"][real] + 1)
    assert not merged["inputs"][~real].any()
    targets.append(merged["targets"][real])
    inputs.append(merged["inputs"])
  # Every token but the first is a target exactly once.
  np.testing.assert_array_equal(np.sort(np.concatenate(targets)), tokens[1:])
  # Rows read contiguous streams across steps.
  rows = np.concatenate(inputs, axis=1)
  for r in range(batch):
    row = rows[r][rows[r] != 0]
    np.testing.assert_array_equal(np.diff(row), np.ones(len(row) - 1))
  assert [len(list(s)) for s in shards] == [len(s) for s in steps]  # Re-iterable.


# ---------------------------------------------------------------- The task.


def _config(data_dir, corpus="stdlib"):
  return ml_collections.ConfigDict(
    {
      "data_dir": str(data_dir),
      "data": {"corpus": corpus, "max_bytes": SMALL_CAP, "split_seed": 0},
      "model": {"segment_length": 16, "bptt_segments": 2},
    }
  )


def test_load_task_stdlib_and_file_corpora(tmp_path, monkeypatch):
  task = byte_lm.load_task(_config(tmp_path), generate=True)
  splits, meta = byte_corpus.build_stdlib_corpus(max_bytes=SMALL_CAP, seed=0)
  assert task.vocab_size == task.num_classes == 257
  np.testing.assert_array_equal(task.splits["validation"]["tokens"], splits["validation"]["tokens"])
  info = byte_lm.corpus_info(_config(tmp_path))
  assert info["fingerprints"] == meta["fingerprints"]
  assert info["train_unigram_entropy_bits"] == pytest.approx(
    byte_lm.unigram_entropy_bits(splits["train"]["tokens"])
  )

  with pytest.raises(DataError, match="mattmahoney.net/dc/text8.zip"):
    byte_lm.load_task(_config(tmp_path, "text8"), generate=True)
  with pytest.raises(ConfigError, match="config.data.corpus"):
    byte_lm.load_task(_config(tmp_path, "enwik9"), generate=True)
  monkeypatch.setitem(byte_lm.FILE_CORPORA, "enwik8", TINY)
  data = _fixture_bytes()
  (tmp_path / "enwik8").write_bytes(data)
  task = byte_lm.load_task(_config(tmp_path, "enwik8"), generate=False)
  np.testing.assert_array_equal(
    task.splits["test"]["tokens"], np.frombuffer(data[960:], np.uint8) + 1
  )
  info = byte_lm.corpus_info(_config(tmp_path, "enwik8"))
  assert info["fingerprints"]["train"] == hashlib.sha256(data[:900]).hexdigest()
