"""The GPU check's command: its reduced mode end to end on CPU, its comparisons, its errors."""

import csv
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_transformers import attention
from efficient_transformers.benchmarks import attention as bench
from efficient_transformers.benchmarks import gpu_check
from tests.helpers import REPO, cli_env

MASKS = {"none", "padding", "causal", "padding+causal"}


def _run(*args: str, timeout: int = 240):
  """The command as a user types it, from the repository root."""
  return subprocess.run(
    [sys.executable, "-m", "efficient_transformers.benchmarks.gpu_check", *args],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _rows(path) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
  """One `--reduced` run with a relative --out (relative to the repo root it runs in)."""
  out = tmp_path_factory.mktemp("gpu_check") / "report"
  result = _run("--reduced", "--out=" + os.path.relpath(out, REPO))
  return result, out


def test_reduced_run_writes_every_part_naming_the_device(reduced_run):
  result, out = reduced_run
  assert result.returncode == 0, result.stderr[-3000:]
  report = (out / "gpu_check.md").read_text()
  assert result.stdout.strip() == report.strip()  # The markdown is printed too.
  assert "Device: **cpu** (platform cpu, 1 device(s)" in report
  for part in gpu_check.PARTS:
    assert f"## {part}" in report
  assert "| correctness | passed, 4 skipped |" in report
  for name in ("correctness", "tflops", "listops", "attention"):
    rows = _rows(out / f"{name}.csv")
    assert rows, name
    for r in rows:
      assert r["device_kind"] == "cpu" and r["platform"] == "cpu"
      assert r["jax_version"] == jax.__version__ and r["num_devices"] == "1"
      assert r["date"].startswith("20")
  assert (out / "attention.png").stat().st_size > 1000
  assert "jax:" in (out / "environment.txt").read_text()


def test_reduced_correctness_really_compares(reduced_run):
  _, out = reduced_run
  rows = _rows(out / "correctness.csv")
  compared = [r for r in rows if not r["error"]]
  # Off CUDA, cuDNN is recorded as skipped and XLA's dot_product stands in for it.
  assert {(r["implementation"], r["mask"], r["quantity"]) for r in compared} == {
    (impl, mask, q)
    for impl in ("dot_product[xla]", "memory_efficient")
    for mask in MASKS
    for q in ("out", "dq", "dk", "dv")
  }
  for r in compared:
    assert r["passed"] == "True"
    # A real bf16 comparison: nonzero error, within the stated tolerance.
    assert 0 < float(r["max_rel_vs_f32"]) <= float(r["tolerance_rel"]) < 0.05
  skipped = [r for r in rows if r["error"]]
  assert {r["implementation"] for r in skipped} == {"dot_product[cudnn]"}
  assert all("needs a CUDA GPU" in r["error"] for r in skipped)


def test_reduced_tflops_listops_and_attention_rows(reduced_run):
  _, out = reduced_run
  tflops = _rows(out / "tflops.csv")
  assert len(tflops) == 4 * 2 * 2  # implementations x lengths x causal.
  for r in tflops:
    b, h, n, d = (int(r[k]) for k in ("batch", "heads", "length", "head_dim"))
    expected = gpu_check.attention_flops(b, h, n, d, r["causal"] == "True") / 1e12
    assert float(r["algorithmic_tflop"]) == pytest.approx(expected)
    if r["implementation"] == "dot_product[cudnn]":
      assert r["error"].startswith("skipped: cuDNN needs a CUDA GPU")
    else:
      assert float(r["ms"]) > 0 and float(r["tflops_per_s"]) > 0 and float(r["xla_tflop"]) > 0
      assert r["fraction_of_peak"] == ""  # No peak for a CPU.
  listops = _rows(out / "listops.csv")
  assert [r["attention"] for r in listops] == ["softmax", "dot_product"]
  for r in listops:
    assert not r["error"] and r["timed_steps"] == "3" and float(r["steps_per_s"]) > 0
    assert float(r["model_flops_per_step"]) > 0 and float(r["xla_flops_per_step"]) > 0
    assert np.isfinite(float(r["last_loss"])) and r["mfu_model"] == ""
  bench_rows = _rows(out / "attention.csv")
  assert {(r["attention"], r["length"]) for r in bench_rows} == {
    ("softmax", "128"),
    ("dot_product", "128"),
  }
  assert all(float(r["step_s"]) > 0 and float(r["total_mib"]) > 0 for r in bench_rows)


def test_rerunning_one_part_keeps_the_others(reduced_run, monkeypatch):
  _, out = reduced_run
  failed = dict(implementation="softmax", causal=False, length=8, batch=1, error="boom")
  monkeypatch.setattr(gpu_check.cli, "run_tflops", lambda *a: [failed])
  # Its one cell failed, so the part failed (exit code 3); the earlier parts stay.
  assert gpu_check.main(["--reduced", "--parts=tflops", f"--out={out}"]) == 3
  report = (out / "gpu_check.md").read_text()
  assert "| correctness | passed, 4 skipped |" in report and "## listops" in report
  assert (
    "| tflops | FAILED, 1 failed |" in report and "| softmax | False | 8 | 1 | boom |" in report
  )


def test_exit_code_says_whether_correctness_passed(tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_check.cli, "run_correctness", lambda *a: ([], False, ""))

  def crash(*args):
    raise RuntimeError("broken part")

  monkeypatch.setattr(gpu_check.cli, "run_tflops", crash)
  argv = ["--reduced", f"--out={tmp_path}"]
  assert gpu_check.main([*argv, "--parts=correctness,tflops"]) == 1
  report = (tmp_path / "gpu_check.md").read_text()
  assert "| correctness | FAILED |" in report
  assert "| tflops | error: RuntimeError: broken part |" in report
  # Correctness not requested: a crashed part alone is exit code 3.
  assert gpu_check.main([*argv, "--parts=tflops"]) == 3


def test_compare_catches_a_wrong_result():
  rng = np.random.default_rng(0)
  ref = rng.standard_normal((2, 64, 2, 16)).astype(np.float32)
  baseline = np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float32)  # bf16 rounding only.
  assert gpu_check.compare(baseline, ref, baseline)["passed"]
  perturbed = baseline.copy()
  perturbed[1, 3, 0, 5] += 0.05 * np.abs(ref).max()
  result = gpu_check.compare(perturbed, ref, baseline)
  assert not result["passed"] and result["max_rel_vs_f32"] > result["tolerance_rel"]
  broken = baseline.copy()
  broken[0, 0, 0, 0] = np.nan
  assert not gpu_check.compare(broken, ref, baseline)["passed"]


def test_compare_catches_an_attention_that_ignores_the_mask():
  q, k, v, do, mask = gpu_check.exact._inputs((3, 32, 2, 16), jnp.bfloat16)
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  ref = attention.softmax_attention(*f32, mask=mask)
  baseline = attention.softmax_attention(q, k, v, mask=mask)
  right = attention.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  wrong = attention.dot_product_attention(q, k, v, implementation="xla")  # Padding ignored.
  assert gpu_check.compare(right, ref, baseline)["passed"]
  assert not gpu_check.compare(wrong, ref, baseline)["passed"]


def test_peak_table_matches_device_kinds():
  assert gpu_check.peak_tflops("NVIDIA H200") == 989.4
  assert gpu_check.peak_tflops("NVIDIA H200 NVL") == 835.5
  assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert gpu_check.peak_tflops("NVIDIA L40S") == 362.05
  assert gpu_check.peak_tflops("NVIDIA L4") == 121.0
  assert gpu_check.peak_tflops("TPU v5 lite") == 197.0
  assert gpu_check.peak_tflops("TPU v5") == 459.0
  assert gpu_check.peak_tflops("cpu") is None
  assert gpu_check.attention_flops(1, 1, 2, 1, causal=False) == 3.5 * 16
  assert gpu_check.attention_flops(1, 1, 2, 1, causal=True) == 3.5 * 8


def test_attention_benchmark_skips_timing_over_the_memory_limit():
  row = bench.measure(
    "softmax", 16, batch=1, dtype=jnp.float32, steps=1, time_it=True, num_layers=1,
    memory_limit_mib=1e-3,
  )  # fmt: skip
  assert "step_s" not in row and row["total_mib"] > 1e-3
  assert row["note"].startswith("not timed: needs")


@pytest.mark.parametrize("case", ["unknown_part", "out_is_a_file"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, case):
  if case == "unknown_part":
    args, expected = [f"--out={tmp_path}", "--parts=correctness,nope"], "unknown ['nope']"
  else:
    (tmp_path / "file").write_text("x")
    args, expected = [f"--out={tmp_path / 'file'}"], "is a file"
  result = _run(*args, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
  assert "Traceback" not in result.stderr and result.stdout == ""
