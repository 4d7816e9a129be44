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
  assert "Unknown attention or mixer 'nope'" in capsys.readouterr().err


def test_targets_table_marks_met_and_missed_targets():
  rows = bench.with_ratios(
    [
      {"attention": "softmax", "length": 4096, "total_mib": 1000.0, "step_s": 2.0},
      {"attention": "softmax", "length": 16384, "total_mib": 16000.0},
      {"attention": "local", "length": 4096, "total_mib": 150.0, "step_s": 1.0},
      {"attention": "local", "length": 16384, "total_mib": 600.0},
      {"attention": "bigbird", "length": 4096, "total_mib": 350.0, "step_s": 3.0},
      {"attention": "bigbird", "length": 16384, "total_mib": 2000.0},
    ]
  )
  lines = {line.split(" | ")[0].strip("| "): line for line in bench.targets(rows).splitlines()}
  assert lines["local"] == "| local | 0.150 (ok <= 0.2) | 0.50 (ok < 1) | 4.00 (ok <= 4.5) |"
  assert lines["bigbird"] == (
    "| bigbird | 0.350 (MISSED <= 0.3) | 1.50 (MISSED < 1) | 5.71 (MISSED <= 4.5) |"
  )
  assert lines["softmax"] == "| softmax | 1.000 | 1.00 | 16.00 |"  # No target for exact.


def test_baseline_mixers_are_rows_beside_the_attentions(tmp_path):
  """The issue's mixer rows: time and memory of lstm and s4d relative to softmax."""
  rc = bench.main(
    [
      "--attentions=lstm,s4d",
      "--lengths=16,64",
      "--batch=1",
      "--steps=1",
      "--num_layers=1",
      f"--out={tmp_path}",
    ]  # fmt: skip
  )
  assert rc == 0
  with open(tmp_path / "attention.csv") as f:
    rows = {(r["attention"], int(r["length"])): r for r in csv.DictReader(f)}
  assert set(rows) == {(a, n) for a in ("softmax", "lstm", "s4d") for n in (16, 64)}
  for name in ("lstm", "s4d"):
    for n in (16, 64):
      r = rows[(name, n)]
      assert not r["error"] and float(r["step_s"]) > 0
      ratio = float(r["total_mib"]) / float(rows[("softmax", n)]["total_mib"])
      assert float(r["memory_vs_softmax"]) == pytest.approx(ratio)
  assert "| lstm | 64 |" in (tmp_path / "attention.md").read_text()


def test_memory_limit_leaves_big_cells_untimed(tmp_path):
  rc = bench.main(
    [
      "--attentions=softmax",
      "--lengths=16",
      "--batch=1",
      "--steps=1",
      "--num_layers=1",
      "--memory_limit_mib=0.01",
      f"--out={tmp_path}",
    ]  # fmt: skip
  )
  assert rc == 0
  with open(tmp_path / "attention.csv") as f:
    (row,) = list(csv.DictReader(f))
  assert float(row["total_mib"]) > 0.01 and row["step_s"] == ""
