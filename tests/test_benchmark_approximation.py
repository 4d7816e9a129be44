"""The approximation-error benchmark: error against exact attention falls as each variant's
knob grows, the errors are what they say, and the command's files and flag errors."""

import csv
import os

import numpy as np
import pytest

from efficient_transformers.benchmarks import approximation as bench

FLAGS = ["--length=64", "--head_dim=16", "--heads=2", "--batch=1", "--seeds=2"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  """One run of the command with a relative --out, as the README's runs."""
  root = tmp_path_factory.mktemp("approximation")
  cwd = os.getcwd()
  os.chdir(root)
  try:
    assert bench.main([*FLAGS, "--out=approx_out"]) == 0
  finally:
    os.chdir(cwd)
  out = root / "approx_out"
  assert (out / "approximation.png").stat().st_size > 0
  assert "| performer | random | 64 | num_features |" in (out / "approximation.md").read_text()
  with open(out / "approximation.csv") as f:
    return [
      {k: (v if k in ("attention", "source", "knob") else float(v)) for k, v in r.items()}
      for r in csv.DictReader(f)
    ]


@pytest.mark.parametrize("name", bench.VARIANTS)
def test_error_falls_as_the_knob_grows(rows, name):
  mine = [r for r in rows if r["attention"] == name]
  values = [r["value"] for r in mine]
  assert values == sorted(values) and len(values) >= 4
  for key in ("map_error", "output_error"):
    errors = [r[key] for r in mine]
    assert errors[-1] < 0.9 * errors[0], (key, errors)
    if name != "performer":  # Random features: falls as 1/sqrt(m), noisily at 2 draws.
      assert all(b <= a * 1.05 for a, b in zip(errors, errors[1:], strict=False)), (key, errors)


def test_windows_that_cover_the_sequence_are_exact(rows):
  for name in ("local", "bigbird"):
    last = [r for r in rows if r["attention"] == name][-1]
    assert last["map_error"] < 1e-5 and last["output_error"] < 1e-5


def test_relative_error_by_hand():
  exact = np.zeros((1, 1, 2, 2))
  exact[0, 0] = [[1.0, 0.0], [0.5, 0.5]]
  approx = exact.copy()
  approx[0, 0, 1] = [0.0, 1.0]  # Row 1 off by (-0.5, 0.5).
  rows_mask = np.array([[True, True]])
  expected = np.sqrt(0.5) / np.sqrt(1.5)
  assert bench.relative_error(approx, exact, rows_mask) == pytest.approx(expected)
  # A padded query row does not count.
  assert bench.relative_error(approx, exact, np.array([[True, False]])) == 0.0


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--attentions=softmax"], "no knob for attention 'softmax'"),
    (["--config=configs/lra/listops.py:smoke"], "--config and --workdir go together"),
    (["--length=0"], "--length"),
  ],
)
def test_bad_flags_are_one_line(flags, message, capsys, tmp_path):
  rc = bench.main([*FLAGS, *flags, f"--out={tmp_path / 'o'}"])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and message in err and "\n" not in err
  assert not (tmp_path / "o" / "approximation.csv").exists()
