"""The decoding benchmark: its table, the state it measures, and its flag errors."""

import csv
import os

import numpy as np
import pytest

from efficient_transformers.benchmarks import decoding as bench
from efficient_transformers.benchmarks import report

TINY_FLAGS = [
  "--contexts=16,64",
  "--num_layers=1",
  "--emb_dim=16",
  "--num_heads=2",
  "--mlp_dim=32",
  "--steps=1",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One run with a relative --out, from the repository root, as the README's command runs."""
  out = tmp_path_factory.mktemp("decoding_bench")
  cwd = os.getcwd()
  os.chdir(out)
  try:
    rc = bench.main([*TINY_FLAGS, "--mixers=lru,linear,softmax", "--out=bench_out"])
  finally:
    os.chdir(cwd)
  with open(out / "bench_out" / "decoding.csv") as f:
    rows = list(csv.DictReader(f))
  return rc, out / "bench_out", rows


def test_rows_per_mixer_and_context(tiny_run):
  rc, out, rows = tiny_run
  assert rc == 0
  assert [(r["mixer"], int(r["context"])) for r in rows] == [
    (m, c) for m in ("lru", "linear", "softmax") for c in (16, 64)
  ]
  text = (out / "decoding.md").read_text()
  assert report.device_line(cpu=True) in text and "1 layers, 16 wide, 2 heads, MLP 32" in text
  for r in rows[:4]:
    assert float(r["speedup"]) == pytest.approx(float(r["recompute_s"]) / float(r["step_s"]))
    assert float(r["score_tps"]) == pytest.approx(int(r["context"]) / float(r["score_s"]))
    assert float(r["step_mib"]) > 0 and float(r["recompute_mib"]) > 0


def test_the_state_does_not_grow_with_the_context(tiny_run):
  _, _, rows = tiny_run
  for name, expected_kib in (
    # lru: 1 layer x 64 complex64 states (its default state_size) + the LM's int32 position.
    ("lru", (64 * 8 + 4) / 1024),
    # linear: S [2 heads, 8 features, 8] + z [2, 8] float32 + position; + the LM's position.
    ("linear", ((2 * 8 * 8 + 2 * 8) * 4 + 4 + 4) / 1024),
  ):
    kib = [float(r["state_kib"]) for r in rows if r["mixer"] == name]
    np.testing.assert_allclose(kib, [expected_kib] * 2)
  step = {int(r["context"]): float(r["step_mib"]) for r in rows if r["mixer"] == "lru"}
  recompute = {int(r["context"]): float(r["recompute_mib"]) for r in rows if r["mixer"] == "lru"}
  assert step[16] == step[64] and recompute[64] > recompute[16]


def test_a_mixer_without_a_recurrent_form_is_an_error_row(tiny_run):
  _, _, rows = tiny_run
  errors = [r["error"] for r in rows if r["mixer"] == "softmax"]
  assert len(errors) == 2 and all("has no token-by-token form" in e for e in errors)


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--mixers=lru,nope", "'nope'"),
    ("--contexts=16,x", "--contexts"),
    ("--emb_dim=15", "--emb_dim"),
  ],
)
def test_bad_flags_are_one_line(flag, message, capsys, tmp_path):
  rc = bench.main([*TINY_FLAGS, flag, f"--out={tmp_path / 'out'}"])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and message in err and "\n" not in err and "Traceback" not in err
  assert not (tmp_path / "out" / "decoding.csv").exists()


def test_dry_run_builds_every_mixer_and_measures_nothing(tmp_path, capsys):
  assert bench.main([*TINY_FLAGS, "--dry_run", f"--out={tmp_path / 'out'}"]) == 0
  assert "7 mixer(s) build and decode" in capsys.readouterr().out
  assert not (tmp_path / "out" / "decoding.csv").exists()
  rc = bench.main([*TINY_FLAGS, "--dry_run", "--mixers=lru,conv", f"--out={tmp_path / 'o2'}"])
  assert rc != 0 and "'conv' has no token-by-token form" in capsys.readouterr().err
