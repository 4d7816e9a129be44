r"""The Long Range Arena suite: a grid of tasks x attentions, trained, tested and tabulated.

Each cell trains `configs/lra/<task>.py` with `attention=NAME` in
`WORKDIR/<task>/<attention>/` through `train_and_evaluate`, then evaluates the
test split with the best-validation checkpoint (`results.json`). The runner
adds a record per cell (`cell.json`: test accuracy, best validation accuracy
and its step, median training steps/s, peak compiled memory of the train step,
wall time, device) and writes, in WORKDIR, `results.md` and `results.csv` in
the form of LRA's Table 1 with the published figure beside each cell,
`results_cells.csv` (one row per cell) and `results_plot.png` (average
accuracy against steps/s, bubble area = memory).

    python -m efficient_transformers.benchmarks.lra --tasks=listops,text \
        --attentions=softmax,performer --workdir=lra_runs [--smoke]
    python -m efficient_transformers.benchmarks.lra ... --config_overrides num_train_steps=50 \
        local:model.attention_kwargs.block_size=32
    python -m efficient_transformers.benchmarks.lra ... --print_commands   # one job per cell
    python -m efficient_transformers.benchmarks.lra ... --cell=listops:softmax
    python -m efficient_transformers.benchmarks.lra --workdir=lra_runs --report_only
    python -m efficient_transformers.benchmarks.lra ... --dry_run   # compile every cell only
    python -m efficient_transformers.benchmarks.lra ... --spt   # and self-pretrained rows

With `--spt` every attention has a second row, NAME+spt, trained in
`WORKDIR/<task>/<NAME>+spt/`: the task's `spt` config arg (self-pretraining on
the task's own training inputs, then fine-tuning from its best checkpoint, rotary
positions where the attention takes them; training/spt.py), scored on the test
split like any cell. Overrides of `spt.*` keys apply to those rows only; one cell
of them is `--cell=TASK:NAME+spt`.

Rerunning a command continues its grid: finished cells are skipped, a cell
whose training stopped resumes from its latest checkpoint, and failed cells
(`failed.json`, shown in the table) are retried. A failing cell never stops the
grid; a cell that another job is training (its workdir is locked) is left to
that job. WORKDIR may be relative or a gs:// URL: every file goes through
`etils.epath`. `--config_overrides KEY=VALUE` applies to every cell, `NAME:KEY=VALUE`
only to the cells of task or attention NAME; values are parsed by the type of
the key's current value, as `--config.KEY=VALUE` flags are.
"""

import argparse
import ast
import dataclasses
import gc
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Sequence

import jax
import ml_collections
from etils import epath

from efficient_transformers import attention, paths
from efficient_transformers.benchmarks import report
from efficient_transformers.benchmarks.lra_report import (
  AVERAGED_TASKS,
  SPT_SUFFIX,
  TASKS,
  _fresh_test_results,
  _log,
  _read_json,
  row_name,
  write_report,
)
from efficient_transformers.errors import ConfigError, UserError
from efficient_transformers.models import mixing
from efficient_transformers.training.metrics import read_records
from efficient_transformers.training.workdir import WorkdirBusyError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(_REPO, "configs", "lra")


_MIB = 2**20


class _Stopped(Exception):
  """Training returned before its last step (a preemption signal): stop the grid."""


# ---------------------------------------------------------------- Tasks, configs, overrides.


def available_tasks() -> list[str]:
  """Tasks with a config file in configs/lra, in LRA's order (others after, sorted)."""
  files = {f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py"}
  return [t for t in TASKS if t in files] + sorted(files - set(TASKS))


def _names(text: str, valid: Sequence[str], what: str) -> list[str]:
  names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    raise ConfigError(
      f"Unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; "
      f"valid: {', '.join(valid)}."
    )
  return names


@dataclasses.dataclass(frozen=True)
class Override:
  """`[scope:]key=value`: set config `key` (dotted) in the cells of task or attention `scope`."""

  scope: str | None
  key: str
  value: str

  def __str__(self) -> str:
    return f"{self.scope + ':' if self.scope else ''}{self.key}={self.value}"


def parse_overrides(items: Sequence[str], scopes: Sequence[str]) -> list[Override]:
  """Parses `KEY=VALUE` / `NAME:KEY=VALUE` items; NAME must be in `scopes`."""
  out = []
  for item in items:
    lhs, sep, value = item.partition("=")
    scope, colon, key = lhs.rpartition(":")
    if not sep or not key.strip():
      raise ConfigError(f"--config_overrides {item!r}: write KEY=VALUE or NAME:KEY=VALUE.")
    if colon and scope not in scopes:
      raise ConfigError(
        f"--config_overrides {item!r}: {scope!r} is neither a task nor an attention; "
        f"valid: {', '.join(scopes)}."
      )
    out.append(Override(scope or None, key.strip(), value))
  return out


def _parse_value(text: str, current, where: str):
  """`text` as the type of `current`, like ml_collections' `--config.KEY=VALUE`."""
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        raise ValueError
      return type(current)(value)
  except (ValueError, SyntaxError):
    raise ConfigError(
      f"--config_overrides {where}: {text!r} is not of type {type(current).__name__} "
      f"(the type of the current value {current!r})."
    ) from None
  try:  # None or another type: a Python literal, else the string itself.
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, override: Override) -> None:
  """Sets `override.key` in `config`; an unknown key is a ConfigError listing the valid ones."""
  *path, leaf = override.key.split(".")
  node = config
  for depth, key in enumerate([*path, leaf]):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node.keys():
      where = "config" + "".join(f".{k}" for k in override.key.split(".")[:depth])
      valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
      hint = ""
      if override.key.startswith("model.attention_kwargs.") and not override.scope:
        hint = (
          f" The keys there are attention {config.model.attention!r}'s; scope the override to "
          "one attention: NAME:model.attention_kwargs.KEY=VALUE."
        )
      raise ConfigError(
        f"--config_overrides {override}: {where} has no {key!r} "
        f"(cell {config.task}:{config.model.attention}). Valid: {valid or '(none)'}.{hint}"
      )
    if depth < len(path):
      node = node[key]
  node[leaf] = _parse_value(override.value, node[leaf], str(override))


def load_task_config(task: str, arg: str) -> ml_collections.ConfigDict:
  """`configs/lra/<task>.py`'s `get_config(arg)`."""
  path = os.path.join(CONFIG_DIR, f"{task}.py")
  spec = importlib.util.spec_from_file_location(f"_lra_config_{task}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def cell_config(
  task: str,
  attention_name: str,
  *,
  smoke: bool,
  overrides: Sequence[Override] = (),
  spt: bool = False,
) -> ml_collections.ConfigDict:
  """The config of cell (task, attention): the task's config with its overrides applied.

  spt: the self-pretrained row's cell (the `spt` config arg); `spt.*` overrides apply to
  those cells only, so a from-scratch cell never pretrains.
  """
  arg = ",".join(["smoke"] * smoke + [f"attention={attention_name}"] + ["spt"] * spt)
  config = load_task_config(task, arg)
  for o in overrides:
    if o.scope in (None, task, attention_name) and (spt or not o.key.startswith("spt.")):
      apply_override(config, o)
  return config


def stage_workdir(workdir, spt: bool):
  """Where a cell's training writes its metrics: the fine-tuning's for a self-pretrained cell."""
  return workdir / "finetune" if spt else workdir


# ---------------------------------------------------------------- What a cell's workdir holds.


def _write_json(path, obj: dict) -> None:
  # Whole: parallel jobs and kills never leave half a file.
  paths.write_text(path, json.dumps(obj, indent=2))


def read_metrics(workdir) -> list[dict]:
  """The records of `workdir/metrics.jsonl` (a torn last line from a kill is dropped)."""
  return read_records(workdir)


def _trained_to_end(workdir, num_train_steps: int) -> bool:
  # The loop evaluates (and saves) at its last step, and only then.
  return any(
    r.get("split") == "validation" and r.get("step") == num_train_steps
    for r in read_metrics(workdir)
  )


def median_steps_per_sec(records: list[dict]) -> float | None:
  """Median training steps/s over the logged intervals after the first (compilation warm-up)."""
  rates = [
    r["steps_per_sec"] for r in records if r.get("split") == "train" and "steps_per_sec" in r
  ]
  rates = rates[1:] or rates
  return statistics.median(rates) if rates else None


def compiled_train_memory(config: ml_collections.ConfigDict) -> dict:
  """XLA's memory analysis of the cell's compiled train step, per device, in MiB.

  train_lib logs it but saves it nowhere, so the step is compiled again here.
  `memory_mib` is temporaries + arguments (what the attention benchmark
  reports); `xla_peak_mib` is XLA's own peak estimate, kept apart because the
  CPU backend reports less than the temporaries there.
  """
  from efficient_transformers.data import tasks
  from efficient_transformers.training import state

  spec = tasks.describe(config)
  setup = state.make_setup(config, spec)
  compiled = setup.compile_train_step(
    setup.abstract_batch(spec.fields, config.batch_size),
    seed=config.seed,
    grad_accum_steps=config.optimizer.grad_accum_steps,
  )
  out = {"num_params": setup.num_params}
  mem = compiled.memory_analysis()
  if mem is not None:
    temp, args = mem.temp_size_in_bytes / _MIB, mem.argument_size_in_bytes / _MIB
    peak = getattr(mem, "peak_memory_in_bytes", 0) / _MIB
    out.update(memory_mib=temp + args, temp_mib=temp, argument_mib=args, xla_peak_mib=peak)
  return out


def _device() -> dict:
  return {
    "device_name": report.device_name(cpu=True),  # A CPU by its model and cores.
    "device_kind": jax.devices()[0].device_kind,
    "platform": jax.default_backend(),
    "num_devices": jax.device_count(),
  }


# ---------------------------------------------------------------- Running one cell.


def _attempts_wall_s(workdir) -> float:
  return sum(r.get("wall_s", 0.0) for r in _jsonl(workdir / "attempts.jsonl"))


def _jsonl(path) -> list[dict]:
  try:
    text = paths.read_text(path) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  except (OSError, ValueError):
    return []


def run_cell(
  task: str,
  attention_name: str,
  root,
  *,
  smoke: bool,
  overrides: Sequence[Override],
  spt: bool = False,
) -> dict:
  """Trains, tests and records one cell (skipped when finished); returns its record.

  spt: the self-pretrained row's cell, in WORKDIR/<task>/<attention>+spt (both stages).
  Any exception is recorded in `failed.json` and returned as a failed record;
  only a preemption signal during training (`_Stopped`) or Ctrl-C outside it
  ends the grid.
  """
  row = row_name(attention_name, spt)
  workdir = epath.Path(root) / task / row
  trained_dir = stage_workdir(workdir, spt)
  cell = f"{task}:{row}"
  failed_path = workdir / "failed.json"
  record_path = workdir / "cell.json"
  main_process = jax.process_index() == 0
  t0, outcome, wall_s = time.perf_counter(), "interrupted", None
  try:
    config = cell_config(task, attention_name, smoke=smoke, overrides=overrides, spt=spt)
    trained = _trained_to_end(trained_dir, config.num_train_steps)
    record = _read_json(record_path)
    if trained and record and _fresh_test_results(workdir):
      _log(f"{cell}: finished before, skipped (test accuracy {record['test_accuracy']:.4f}).")
      outcome = "skipped"
      return record
    previous = _read_json(failed_path)
    if previous:
      _log(f"{cell}: failed before ({previous.get('error', '?')}); retrying.")
    if not trained:
      _log(f"{cell}: training in {workdir} (resumes from its latest checkpoint if any).")
      from efficient_transformers.training import train_and_evaluate

      train_and_evaluate(config, workdir)
      if not _trained_to_end(trained_dir, config.num_train_steps):
        outcome = "stopped"
        raise _Stopped(f"{cell}: training stopped before step {config.num_train_steps}.")
    from efficient_transformers.training import eval_lib

    results = _fresh_test_results(workdir) or eval_lib.evaluate_checkpoint(
      config, workdir, which="best", split="test"
    )
    wall_s = time.perf_counter() - t0
    records = read_metrics(trained_dir)
    best_val = [
      r for r in records if r.get("split") == "validation" and r.get("step") == results["step"]
    ]
    record = {
      "task": task,
      "attention": row,
      "status": "finished",
      "test_accuracy": results["test"]["accuracy"],
      "test_loss": results["test"]["loss"],
      "best_step": results["step"],
      "best_val_accuracy": best_val[-1]["accuracy"] if best_val else None,
      "num_train_steps": config.num_train_steps,
      "steps_per_sec": median_steps_per_sec(records),
      **compiled_train_memory(config),
      "wall_s": _attempts_wall_s(workdir) + wall_s,
      **{k: results.get(k, v) for k, v in _device().items()},
      "jax_version": jax.__version__,
    }
    if spt:
      record.update(base_attention=attention_name, **_pretraining_record(workdir, config))
    outcome = "finished"
    if main_process:
      _write_json(record_path, record)
      if failed_path.exists():
        failed_path.unlink()
    _log(f"{cell}: test accuracy {record['test_accuracy']:.4f} (best step {record['best_step']}).")
    return record
  except _Stopped:
    raise
  except WorkdirBusyError as e:
    outcome = "busy"  # Another job is training this cell: not a failure, nothing recorded.
    _log(f"{cell}: left to the job that holds it: {e}")
    return {"task": task, "attention": row, "status": "busy", "error": str(e)}
  except Exception as e:  # noqa: BLE001 - one cell's failure must not end the grid.
    outcome = "failed"
    message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    message = message.strip() or type(e).__name__
    failure = {"task": task, "attention": row, "status": "failed", "error": message}
    if not isinstance(e, UserError):
      failure["traceback"] = traceback.format_exc()
      _log(failure["traceback"])
    if main_process:
      workdir.mkdir(parents=True, exist_ok=True)
      _write_json(failed_path, {**failure, **_device(), "time": time.time()})
    _log(f"{cell}: FAILED: {message} (recorded in {failed_path}; a rerun retries it).")
    return failure
  finally:
    if main_process and outcome not in ("skipped", "busy") and workdir.is_dir():
      # The memory probe's compilation is not part of the cell's cost.
      wall_s = time.perf_counter() - t0 if wall_s is None else wall_s
      attempt = {"time": time.time(), "wall_s": wall_s, "outcome": outcome}
      lines = [json.dumps(r) for r in _jsonl(workdir / "attempts.jsonl")] + [json.dumps(attempt)]
      paths.write_text(workdir / "attempts.jsonl", "\n".join(lines) + "\n")


def _pretraining_record(workdir, config: ml_collections.ConfigDict) -> dict:
  """Stage 1 of a self-pretrained cell: its steps, objective, speed and best token accuracy."""
  records = read_metrics(workdir / "pretrain")
  valid = [r["accuracy"] for r in records if r.get("split") == "validation" and "accuracy" in r]
  return {
    "pretrain_steps": config.spt.pretrain_steps,
    "pretrain_objective": config.spt.objective,
    "pretrain_steps_per_sec": median_steps_per_sec(records),
    "pretrain_val_token_accuracy": max(valid) if valid else None,
  }


# ---------------------------------------------------------------- Command line.


def cell_command(
  args: argparse.Namespace, task: str, attention_name: str, spt: bool = False
) -> str:
  """The command running one cell, for a job scheduler."""
  parts = [
    "python", "-m", "efficient_transformers.benchmarks.lra",
    f"--workdir={args.workdir}", f"--cell={task}:{row_name(attention_name, spt)}",
  ]  # fmt: skip
  if args.smoke:
    parts.append("--smoke")
  if args.config_overrides:
    parts += ["--config_overrides", *args.config_overrides]
  return shlex.join(parts)


def _dry_run(tasks, names, arms, *, smoke: bool, overrides) -> int:
  """Builds and compiles every cell's train step (train.py --dry_run); writes nothing.
  A self-pretrained cell compiles both stages' steps."""
  from efficient_transformers.training import train_lib

  failed = []
  for task in tasks:
    for name in names:
      for spt in arms:
        cell = f"{task}:{row_name(name, spt)}"
        try:
          config = cell_config(task, name, smoke=smoke, overrides=overrides, spt=spt)
          report = train_lib.dry_run(config)
        except UserError as e:
          failed.append(cell)
          _log(f"{cell}: error: {e}")
          continue
        memory = f", {report['total_mib']:.1f} MiB per device" if "total_mib" in report else ""
        flops = f", {report['flops']:.3g} FLOPs per step" if "flops" in report else ""
        stage = " (fine-tuning; pretraining compiles too)" if "pretrain" in report else ""
        _log(f"{cell}: compiles; {report['num_params']:,} parameters{memory}{flops}{stage}.")
        jax.clear_caches()
  if failed:
    _log(f"{len(failed)} cell(s) would fail: {', '.join(failed)}.")
  return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--tasks", default=None, help="default: LRA's five (no Path-X)")
  parser.add_argument("--attentions", default=None, help="default: every registered variant")
  parser.add_argument("--workdir", required=True, help="cells run in WORKDIR/<task>/<attention>")
  parser.add_argument("--smoke", action="store_true", help="the configs' smoke variants")
  parser.add_argument(
    "--config_overrides", nargs="*", default=[], metavar="[NAME:]KEY=VALUE",
    help="config.KEY=VALUE in every cell, or only in task or attention NAME's cells",
  )  # fmt: skip
  parser.add_argument(
    "--spt",
    action="store_true",
    help="also the self-pretrained rows (NAME+spt): the task's spt config arg",
  )
  parser.add_argument(
    "--cell", default=None, metavar="TASK:ATTENTION[+spt]", help="run one cell only"
  )
  parser.add_argument("--report_only", action="store_true", help="only rebuild the results files")
  parser.add_argument("--print_commands", action="store_true", help="print one command per cell")
  parser.add_argument(
    "--dry_run", action="store_true", help="compile every cell's train step; train nothing"
  )
  args = parser.parse_args(argv)
  try:
    root = paths.resolve(args.workdir, what="--workdir")
    # Any attention or baseline mixer is a row; the default grid is the attentions.
    valid_tasks, valid_attentions = available_tasks(), mixing.available()
    default_tasks = ",".join(t for t in valid_tasks if t in AVERAGED_TASKS)
    arms = [False, True] if args.spt else [False]
    if args.cell is not None:
      task, colon, name = args.cell.partition(":")
      if not colon:
        raise ConfigError(f"--cell={args.cell!r}: write TASK:ATTENTION, e.g. listops:softmax.")
      arms = [name.endswith(SPT_SUFFIX)]
      args.tasks, args.attentions = task, name.removesuffix(SPT_SUFFIX)
    tasks = _names(args.tasks or default_tasks, valid_tasks, "task")
    names = _names(
      args.attentions or ",".join(attention.available()), valid_attentions, "attention"
    )
    overrides = parse_overrides(args.config_overrides, [*valid_tasks, *valid_attentions])
    rows = [row_name(n, spt) for n in names for spt in arms]
    if args.report_only:
      print(write_report(root, tasks if args.tasks else (), rows if args.attentions else ()))
      return 0
    if args.print_commands:
      for task in tasks:
        for name in names:
          for spt in arms:
            print(cell_command(args, task, name, spt))
      return 0
    # A wrong override key is a mistake in the command, not in a cell: refuse before training.
    for task in tasks:
      for name in names:
        for spt in arms:
          try:
            cell_config(task, name, smoke=args.smoke, overrides=overrides, spt=spt)
          except ConfigError as e:
            if str(e).startswith("--config_overrides"):
              raise
          except Exception:  # noqa: BLE001 - the cell records its own failure.
            pass
    if args.dry_run:
      return _dry_run(tasks, names, arms, smoke=args.smoke, overrides=overrides)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  records, cells = [], [(t, n, spt) for t in tasks for n in names for spt in arms]
  try:
    for i, (task, name, spt) in enumerate(cells):
      _log(f"[{i + 1}/{len(cells)}] {task}:{row_name(name, spt)}")
      records.append(run_cell(task, name, root, smoke=args.smoke, overrides=overrides, spt=spt))
      # Free the finished cell's executables and buffers before the next one compiles.
      jax.clear_caches()
      gc.collect()
  except (_Stopped, KeyboardInterrupt) as e:
    _log(f"{e or 'Interrupted'}; rerun the same command to continue the grid.")
    return 130
  failed = [f"{r['task']}:{r['attention']}" for r in records if r["status"] == "failed"]
  if args.cell is not None:
    _log(
      "When every cell has finished: python -m efficient_transformers.benchmarks.lra "
      f"--workdir={shlex.quote(args.workdir)} --report_only"
    )
  elif jax.process_index() == 0:
    print(write_report(root, tasks, rows))
    _log(f"Wrote results.md, results.csv, results_plot.png in {root}.")
  if failed:
    _log(f"{len(failed)} cell(s) failed: {', '.join(failed)}. Rerun the command to retry them.")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
