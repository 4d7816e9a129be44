"""The self-pretraining benchmark (`python -m efficient_transformers.benchmarks.spt`): the
two arms' configs on one budget, the table's arithmetic, and its bad flags. The runs are
faked here; tests/test_spt.py trains the stages themselves."""

import json
import statistics

import pytest

from efficient_transformers.benchmarks import spt as spt_benchmark


def test_both_arms_share_the_budget_and_the_table_is_their_seeds(tmp_path):
  seen = []

  def fake(config, workdir):
    seen.append((config, workdir))
    return 0.1 * config.seed + (0.05 if config.spt.pretrain_steps else 0.0)

  status = spt_benchmark.benchmark(
    [
      "--tasks=listops",
      "--smoke",
      "--seeds=0,1,2",
      "--steps=40",
      "--pretrain_fraction=0.25",
      f"--workdir={tmp_path / 'runs'}",
      f"--out={tmp_path / 'out'}",
    ],
    run=fake,
  )
  assert status == 0
  assert len(seen) == 6 and len({w for _, w in seen}) == 6
  for config, workdir in seen:
    assert config.spt.pretrain_steps + config.num_train_steps == 40
    assert config.model.positional == "rope"  # Both arms: only the pretraining differs.
    arm = "spt" if config.spt.pretrain_steps else "scratch"
    assert workdir.endswith(f"listops/{arm}_seed{config.seed}")
    assert config.spt.pretrain_steps in (0, 10)
  rows = {r["arm"]: r for r in json.loads((tmp_path / "out" / "spt.json").read_text())}
  assert rows["scratch"]["steps"] == "0 + 40" and rows["spt"]["steps"] == "10 + 30"
  assert rows["scratch"]["mean"] == pytest.approx(0.1)
  assert rows["spt"]["mean"] == pytest.approx(0.15)
  assert rows["spt"]["std"] == pytest.approx(statistics.stdev([0.05, 0.15, 0.25]))
  assert "0.0500, 0.1500, 0.2500" in (tmp_path / "out" / "spt.md").read_text()


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--tasks=bogus", "--tasks: unknown bogus"),
    ("--seeds=a", "--seeds must be comma-separated integers >= 0"),
    ("--pretrain_fraction=1.0", "--pretrain_fraction must be in (0, 1)"),
  ],
)
def test_bad_flags_are_one_line(flag, message, tmp_path, capsys):
  status = spt_benchmark.main([flag, f"--workdir={tmp_path / 'runs'}"])
  assert status == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert not (tmp_path / "runs").exists()


def test_the_gpu_plan_is_flops_times_steps_over_the_stated_rate(monkeypatch):
  from efficient_transformers.errors import ConfigError
  from efficient_transformers.training import train_lib

  def fake_dry_run(config):
    if config.model.kind == "dual_encoder" and config.spt.pretrain_steps:
      raise ConfigError("config.spt pretrains a one-tower classifier's encoder")
    report = {"flops": 2e12}
    if config.spt.pretrain_steps:
      report["pretrain"] = {"flops": 1e12}
    return report

  monkeypatch.setattr(train_lib, "dry_run", fake_dry_run)
  rows = spt_benchmark.plan_rows(["listops", "retrieval"], tflops=100.0)
  by = {(r["task"], r["arm"]): r for r in rows}
  scratch, spt = by[("listops", "scratch")], by[("listops", "spt")]
  assert scratch["steps"] == "5000" and scratch["hours"] == pytest.approx(2e12 * 5000 / 1e14 / 3600)
  assert spt["steps"] == "5000 + 5000"
  assert spt["total_pflops"] == pytest.approx((1e12 + 2e12) * 5000 / 1e15)
  assert (
    spt["command"]
    == "python train.py --config=configs/lra/listops.py:spt --workdir=workdirs/listops_spt"
  )
  assert "one-tower" in by[("retrieval", "spt")]["error"]
