"""The attention benchmark's command runs and writes its table, CSV and plot."""

import csv

import pytest

from efficient_transformers.benchmarks import attention as bench


def test_benchmark_writes_ratios_against_softmax(tmp_path, capsys):
  rc = bench.main(
    [
      "--attentions=memory_efficient",
      "--lengths=16,32",
      "--batch=1",
      "--steps=1",
      "--num_layers=1",
      f"--out={tmp_path}",
    ]  # fmt: skip
  )
  assert rc == 0
  with open(tmp_path / "attention.csv") as f:
    rows = list(csv.DictReader(f))
  assert {(r["attention"], r["length"]) for r in rows} == {
    (a, n) for a in ("softmax", "memory_efficient") for n in ("16", "32")
  }
  for r in rows:
    assert float(r["total_mib"]) > 0 and float(r["step_s"]) > 0
    if r["attention"] == "softmax":
      assert float(r["time_vs_softmax"]) == pytest.approx(1.0)
      assert float(r["memory_vs_softmax"]) == pytest.approx(1.0)
  assert (tmp_path / "attention.png").stat().st_size > 1000
  assert "| memory_efficient | 32 |" in (tmp_path / "attention.md").read_text()


def test_benchmark_rejects_unknown_attention(capsys):
  assert bench.main(["--attentions=nope", "--lengths=16"]) == 2
  assert "Unknown attention 'nope'" in capsys.readouterr().err
