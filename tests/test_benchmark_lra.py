"""The LRA suite runner: a grid that skips, resumes, records failures and writes Table 1.

One tiny 2 x 2 grid (ListOps and generated Pathfinder-32, local and softmax)
is run once for the module, in the order a user would meet it: a cell run
alone as a cluster job (ListOps local, made to fail), a ListOps softmax cell
whose training was cut short, the whole grid (local retried and failing again
on ListOps, softmax resumed, the Pathfinder cells trained), then the grid
again (finished cells skipped). Each cell compiles its model: about two
minutes of CPU for the file.
"""

import contextlib
import csv
import io
import json
import os
import shlex

import pytest

from efficient_transformers.benchmarks import lra, lra_report
from efficient_transformers.training import train_and_evaluate

# tests/helpers.py's tiny_config as runner overrides: seconds per cell.
TINY = [
  "listops:data.num_train=96", "listops:data.num_val=20", "listops:data.num_test=20",
  "listops:data.min_length=5", "listops:data.max_length=32", "listops:model.max_length=32",
  # 60 generated 32 x 32 images: 48 / 6 / 6 (the seeded 80/10/10 split).
  "pathfinder:data.num_images=60",
  "model.num_layers=1", "model.emb_dim=16",
  "model.qkv_dim=16", "model.mlp_dim=32", "model.classifier_dim=16", "model.num_heads=2",
  "batch_size=8", "num_train_steps=4", "eval_every_steps=2", "checkpoint_every_steps=2",
  "log_every_steps=1", "optimizer.warmup_steps=1",
  # A cell that cannot build its model (blocks longer than ListOps' 33 positions): recorded as
  # failed, and the grid goes on. Pathfinder's 1,024 pixels take the same blocks.
  "local:model.attention_kwargs.block_size=1000",
]  # fmt: skip
TASKS = ["listops", "pathfinder"]
GRID = [f"--tasks={','.join(TASKS)}", "--attentions=local,softmax", "--smoke"]


def _overrides(tmp):
  data = [f"{task}:data_dir={tmp / 'data' / task}" for task in TASKS]
  return ["--config_overrides", *data, *TINY]


def _train_steps(workdir):
  return [r["step"] for r in lra.read_metrics(str(workdir)) if r["split"] == "train"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lra")
  root = tmp / "runs"
  args = [f"--workdir={root}", *GRID, *_overrides(tmp)]
  logs = {}

  def run(name, *extra):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      rc = lra.main([*args, *extra])
    logs[name] = (rc, out.getvalue(), err.getvalue())

  # 1. One cell as its own job: it fails, alone.
  run("cell", "--cell=listops:local")
  logs["dirs_after_cell"] = sorted(os.listdir(root / "listops"))
  logs["report_after_cell"] = (root / "results.md").exists()
  # 2. A softmax run stopped at step 2 of 4: checkpoints, no results.json.
  overrides = lra.parse_overrides(_overrides(tmp)[1:], [*TASKS, "local"])
  config = lra.cell_config("listops", "softmax", smoke=True, overrides=overrides)
  config.num_train_steps = 2
  train_and_evaluate(config, str(root / "listops" / "softmax"))
  logs["softmax_steps_before"] = _train_steps(root / "listops" / "softmax")
  # 3. The whole grid, then 4. the grid again.
  run("grid")
  logs["softmax_mtime"] = (root / "listops" / "softmax" / "results.json").stat().st_mtime_ns
  run("rerun")
  return root, logs


def test_a_lone_cell_job_runs_only_that_cell(grid):
  _, logs = grid
  rc, _, err = logs["cell"]
  assert rc == 1, err  # A failed cell job exits non-zero, for the scheduler to see.
  assert logs["dirs_after_cell"] == ["local"]
  assert not logs["report_after_cell"]  # Parallel jobs leave the report to --report_only.
  assert "--report_only" in err  # ... and say so.


def test_grid_resumes_a_stopped_cell_and_records_a_failed_one(grid):
  root, logs = grid
  rc, _, err = logs["grid"]
  assert rc == 1, err  # One cell failed; the other finished.
  workdir = root / "listops" / "softmax"
  # Resumed at step 2 rather than retrained from scratch.
  assert logs["softmax_steps_before"] == [1, 2]
  assert _train_steps(workdir) == [1, 2, 3, 4]
  record = json.loads((workdir / "cell.json").read_text())
  assert record["status"] == "finished" and record["num_train_steps"] == 4
  results = json.loads((workdir / "results.json").read_text())
  assert results["checkpoint"] == "best" and "test" in results
  assert record["test_accuracy"] == results["test"]["accuracy"]
  val = {
    r["step"]: r["accuracy"] for r in lra.read_metrics(str(workdir)) if r["split"] == "validation"
  }
  assert sorted(val) == [2, 4]
  assert (
    record["best_step"] == results["step"] == min(s for s in val if val[s] == max(val.values()))
  )
  assert record["best_val_accuracy"] == max(val.values())
  assert record["steps_per_sec"] > 0 and record["memory_mib"] > 0 and record["wall_s"] > 0
  assert record["device_kind"] and record["num_params"] > 0
  assert record["device_name"].endswith(" cores (cpu)"), record["device_name"]
  failed = json.loads((root / "listops" / "local" / "failed.json").read_text())
  assert "block_size=1000 is larger than the sequence length" in failed["error"]
  assert "traceback" not in failed  # A UserError: its message alone.
  assert "listops:local: FAILED: attention 'local': block_size=1000" in err
  assert "Rerun the command to retry them" in err
  # The failure came first and the grid went on, through the second task.
  assert err.index("listops:local: FAILED") < err.index("listops:softmax: test accuracy")
  assert err.index("listops:softmax: test accuracy") < err.index("pathfinder:local: test accuracy")
  for name in ("local", "softmax"):
    record = _cell(root, "pathfinder", name)
    assert record["status"] == "finished" and record["num_train_steps"] == 4


def test_rerun_retries_failed_cells_and_skips_finished(grid):
  root, logs = grid
  assert "listops:local: failed before (attention 'local'" in logs["grid"][2]
  rc, _, err = logs["rerun"]
  assert rc == 1
  assert "listops:local: failed before (" in err and "retrying" in err
  for cell in ("listops:softmax", "pathfinder:local", "pathfinder:softmax"):
    assert f"{cell}: finished before, skipped" in err
  assert (root / "listops" / "softmax" / "results.json").stat().st_mtime_ns == logs["softmax_mtime"]
  assert _train_steps(root / "listops" / "softmax") == [1, 2, 3, 4]


def _cell(root, task, name):
  return json.loads((root / task / name / "cell.json").read_text())


def test_results_table_csv_and_plot(grid):
  root, logs = grid
  md = (root / "results.md").read_text()
  assert md.strip() in logs["rerun"][1]  # Also printed.
  lines = md.splitlines()
  assert "| Attention | LRA model | ListOps | Pathfinder | Avg |" in lines
  rows = [line for line in lines if line.startswith("| ") and "LRA model" not in line]
  acc = {
    (task, name): _cell(root, task, name)["test_accuracy"] * 100
    for task, name in [("listops", "softmax"), ("pathfinder", "softmax"), ("pathfinder", "local")]
  }
  soft_avg = (acc["listops", "softmax"] + acc["pathfinder", "softmax"]) / 2
  # Rows in the order asked for; the published figure beside ours; the average over the
  # finished tasks, and how many of the grid's tasks it covers.
  local_pf = f"{acc['pathfinder', 'local']:.2f}"
  assert rows[0] == (
    f"| local | Local Attention | FAILED (15.82) | {local_pf} (66.63) | {local_pf} (66.63) "
    "[1/2 tasks] |"
  )
  assert rows[1] == (
    f"| softmax | Transformer | {acc['listops', 'softmax']:.2f} (36.37) | "
    f"{acc['pathfinder', 'softmax']:.2f} (71.40) | {soft_avg:.2f} ({(36.37 + 71.40) / 2:.2f}) |"
  )
  softmax = _cell(root, "listops", "softmax")
  assert f"Device: {softmax['device_name']}." in md
  assert "block_size=1000 is larger" in md  # The failed cell's error in the per-cell table.
  with open(root / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["attention"] for r in table] == ["local", "softmax"]
  local, soft = table
  assert local["listops"] == "FAILED"
  assert float(local["avg"]) == pytest.approx(acc["pathfinder", "local"], abs=1e-3)
  assert float(local["listops_published"]) == 15.82
  assert float(soft["listops"]) == pytest.approx(acc["listops", "softmax"], abs=1e-3)
  assert float(soft["pathfinder"]) == pytest.approx(acc["pathfinder", "softmax"], abs=1e-3)
  assert float(soft["listops_published"]) == 36.37
  assert float(soft["pathfinder_published"]) == 71.40
  assert float(soft["avg"]) == pytest.approx(soft_avg, abs=1e-3)  # The CSV keeps 4 decimals.
  assert float(soft["avg_published"]) == pytest.approx((36.37 + 71.40) / 2)
  memory = [_cell(root, task, "softmax")["memory_mib"] for task in TASKS]
  assert float(soft["memory_mib"]) == pytest.approx(sum(memory) / 2, rel=1e-5)
  with open(root / "results_cells.csv") as f:
    statuses = {(r["task"], r["attention"]): r["status"] for r in csv.DictReader(f)}
  assert statuses == {
    ("listops", "local"): "failed",
    ("listops", "softmax"): "finished",
    ("pathfinder", "local"): "finished",
    ("pathfinder", "softmax"): "finished",
  }
  assert (root / "results_plot.png").stat().st_size > 1000


def test_report_only_rebuilds_from_finished_cells(grid, capsys):
  root, _ = grid
  before = (root / "results.md").read_text()
  for name in ("results.md", "results.csv", "results_plot.png"):
    os.remove(root / name)
  assert lra.main([f"--workdir={root}", *GRID, "--report_only"]) == 0
  assert (root / "results.md").read_text() == before
  assert (root / "results.csv").exists() and (root / "results_plot.png").exists()
  assert before.strip() in capsys.readouterr().out
  # Without a grid: every cell in the workdir, rows in LRA's order (Transformer first).
  assert lra.main([f"--workdir={root}", "--report_only"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
  assert rows[1].startswith("| softmax | Transformer |")
  assert rows[2].startswith("| local | Local Attention | FAILED (15.82) | ")


def test_print_commands_gives_one_job_per_cell(grid, capsys, tmp_path):
  root, _ = grid
  argv = [f"--workdir={root}", *GRID, *_overrides(tmp_path)]
  assert lra.main([*argv, "--print_commands"]) == 0
  lines = capsys.readouterr().out.splitlines()
  cells = [(task, name) for task in TASKS for name in ("local", "softmax")]
  assert len(lines) == len(cells) == 4
  for line, (task, name) in zip(lines, cells, strict=True):
    words = shlex.split(line)
    assert words[:3] == ["python", "-m", "efficient_transformers.benchmarks.lra"]
    assert f"--cell={task}:{name}" in words and "--smoke" in words
    assert words[words.index("--config_overrides") + 1 :] == _overrides(tmp_path)[1:]
  assert not (tmp_path / "data").exists()  # Printing runs nothing.


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--tasks=listops,nope"], "error: Unknown task 'nope'; valid: listops"),
    (["--attentions=softmax,nope"], "error: Unknown attention 'nope'; valid: "),
    (["--cell=listops"], "write TASK:ATTENTION"),
    (["--tasks=listops", "--attentions=softmax", "--config_overrides", "model.nope=1"],
     "config.model has no 'nope'"),
    (["--tasks=listops", "--attentions=softmax", "--config_overrides", "batch_size=big"],
     "'big' is not of type int"),
    (["--tasks=listops", "--attentions=softmax,local", "--config_overrides",
      "model.attention_kwargs.block_size=8"], "scope the override to one attention"),
    (["--tasks=listops", "--attentions=softmax", "--config_overrides", "nope:seed=1"],
     "'nope' is neither a task nor an attention"),
  ],
)  # fmt: skip
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
  assert lra.main([f"--workdir={tmp_path}", *argv]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1, err
  assert os.listdir(tmp_path) == []  # Nothing ran.


def test_overrides_take_the_type_of_the_current_value():
  scopes = ["listops", "softmax", "local"]
  overrides = lra.parse_overrides(
    [
      "num_train_steps=50",
      "optimizer.learning_rate=2e-3",
      "data.generate=false",
      "model.positional=learned",
      "local:model.attention_kwargs.block_size=4",
      "softmax:seed=7",
    ],
    scopes,
  )
  local = lra.cell_config("listops", "local", smoke=True, overrides=overrides)
  assert local.num_train_steps == 50 and isinstance(local.num_train_steps, int)
  assert local.optimizer.learning_rate == 2e-3 and local.data.generate is False
  assert local.model.positional == "learned"
  assert local.model.attention_kwargs.block_size == 4
  assert local.seed == 0  # The softmax-only override is not applied here.
  assert lra.cell_config("listops", "softmax", smoke=True, overrides=overrides).seed == 7


def test_table_averages_lra_tasks_and_maps_published_names():
  def done(task, name, acc, sps=10.0):
    return dict(
      task=task, attention=name, status="finished", test_accuracy=acc, steps_per_sec=sps,
      memory_mib=100.0, device_kind="TPU v3", platform="tpu", num_devices=16,
    )  # fmt: skip

  cells = [
    done("listops", "dot_product", 0.40),
    done("text", "dot_product", 0.60),
    done("pathx", "dot_product", 0.90),  # Path-X stays out of the average, as in LRA.
    done("listops", "nystromformer", 0.30),
    {"task": "text", "attention": "nystromformer", "status": "failed", "error": "a | b"},
  ]
  md = lra_report.markdown(cells)
  assert "| Attention | LRA model | ListOps | Text | Path-X | Avg |" in md
  assert (
    "| dot_product | Transformer | 40.00 (36.37) | 60.00 (64.27) | 90.00 (-) | 50.00 (50.32) |"
  ) in md
  assert (
    "| nystromformer | - | 30.00 (-) | FAILED (-) | not run (-) | 30.00 (-) [1/2 tasks] |" in md
  )
  assert "a \\| b" in md  # Escaped in the per-cell table.
  assert "Device: TPU v3 (tpu, 16 device(s))." in md
  # A cell that names its machine (a CPU by model and cores) is named so, beside the others.
  named = dict(done("text", "linear", 0.5), device_name="CPU Some EPYC, 2 cores (cpu)")
  assert "Device: CPU Some EPYC, 2 cores (cpu); TPU v3 (tpu, 16 device(s))." in (
    lra_report.markdown([*cells, named])
  )
  assert lra.median_steps_per_sec(
    [{"split": "train", "steps_per_sec": s} for s in (1.0, 5.0, 3.0, 4.0)]
    + [{"split": "validation", "accuracy": 0.5}]
  ) == pytest.approx(4.0)  # The first (compiling) interval is dropped.


def test_a_preempted_cell_stops_the_grid_without_failing(tmp_path, monkeypatch, capsys):
  import efficient_transformers.training as training

  # train_and_evaluate returns early after SIGTERM/SIGINT (it saved a checkpoint first).
  monkeypatch.setattr(training, "train_and_evaluate", lambda config, workdir: {})
  argv = [f"--workdir={tmp_path}", "--tasks=listops", "--attentions=softmax,local", "--smoke"]
  assert lra.main(argv) == 130
  err = capsys.readouterr().err
  assert "listops:softmax: training stopped before step 400" in err
  assert "rerun the same command to continue" in err
  assert "listops:local" not in err  # The grid stopped there.
  assert os.listdir(tmp_path) == []  # Not recorded as failed; nothing written.


@pytest.fixture(scope="module")
def spt_grid(tmp_path_factory):
  """`--spt` on one task and attention: a from-scratch row and a self-pretrained row, run,
  then run again; and the grid's commands printed."""
  tmp = tmp_path_factory.mktemp("lra_spt")
  root = tmp / "runs"
  overrides = [*_overrides(tmp), "spt.pretrain_steps=2"]
  args = [f"--workdir={root}", "--tasks=listops", "--attentions=softmax", "--smoke", "--spt"]
  logs = {}
  for name, extra in [("grid", []), ("rerun", []), ("commands", ["--print_commands"])]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      rc = lra.main([*args, *overrides, *extra])
    logs[name] = (rc, out.getvalue(), err.getvalue())
  return root, logs


def test_spt_rows_beside_the_from_scratch_rows(spt_grid):
  root, logs = spt_grid
  rc, out, err = logs["grid"]
  assert rc == 0, err
  scratch, spt = _cell(root, "listops", "softmax"), _cell(root, "listops", "softmax+spt")
  # The from-scratch cell never pretrains: the spt.* override is the SPT row's alone.
  assert not (root / "listops" / "softmax" / "pretrain").exists()
  assert "pretrain_steps" not in scratch
  workdir = root / "listops" / "softmax+spt"
  assert {"pretrain", "finetune"} <= set(os.listdir(workdir))
  assert spt["status"] == "finished" and spt["base_attention"] == "softmax"
  assert spt["pretrain_steps"] == 2 and spt["pretrain_objective"] == "masked_tokens"
  assert 0 <= spt["pretrain_val_token_accuracy"] <= 1 and spt["pretrain_steps_per_sec"] > 0
  results = json.loads((workdir / "results.json").read_text())
  assert results["stage"] == "finetune" and spt["test_accuracy"] == results["test"]["accuracy"]
  # Its training record is the fine-tuning's (4 steps), not the pretraining's (2).
  assert _train_steps(workdir / "finetune") == [1, 2, 3, 4] and spt["num_train_steps"] == 4
  valid = [r for r in lra.read_metrics(str(workdir / "finetune")) if r["split"] == "validation"]
  assert spt["best_val_accuracy"] in [r["accuracy"] for r in valid]
  # Table 1: the SPT row right after its from-scratch row, with no published figure.
  rows = [line for line in out.splitlines() if line.startswith("| softmax")]
  assert rows[0].startswith("| softmax | Transformer | ")
  assert rows[1] == (
    f"| softmax+spt | Transformer + SPT | {spt['test_accuracy'] * 100:.2f} (-) | "
    f"{spt['test_accuracy'] * 100:.2f} (-) |"
  )
  assert "Rows NAME+spt: self-pretrained" in out
  with open(root / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["attention"] for r in table] == ["softmax", "softmax+spt"]
  assert table[1]["listops_published"] == "" and table[1]["lra_name"] == "Transformer + SPT"


def test_spt_rows_rerun_skipped_and_printed_as_their_own_jobs(spt_grid, tmp_path):
  root, logs = spt_grid
  rc, _, err = logs["rerun"]
  assert rc == 0, err
  for cell in ("listops:softmax", "listops:softmax+spt"):
    assert f"{cell}: finished before, skipped" in err
  rc, out, _ = logs["commands"]
  cells = [w for line in out.splitlines() for w in shlex.split(line) if w.startswith("--cell=")]
  assert cells == ["--cell=listops:softmax", "--cell=listops:softmax+spt"]
  # One printed job is one cell: the SPT one alone, from its --cell.
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    argv = [f"--workdir={root}", "--cell=listops:softmax+spt", "--smoke", *_overrides(tmp_path)]
    assert lra.main([*argv, "spt.pretrain_steps=2"]) == 0
  assert "[1/1] listops:softmax+spt" in err.getvalue()
