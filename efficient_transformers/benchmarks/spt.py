r"""From scratch against self-pretraining + fine-tuning, on the same total step budget.

    python -m efficient_transformers.benchmarks.spt --tasks=listops,pathfinder --smoke \
        --seeds=0,1,2 --steps=400 --workdir=spt_runs --out=benchmarks_out/spt

For each task and seed, two runs of the task's config (its smoke variant with --smoke):

  scratch   the classifier trained --steps steps;
  spt       the `spt` config arg: --pretrain_fraction of the steps self-pretraining on the
            task's own training inputs (masked tokens at the task's rate), the rest
            fine-tuning from that encoder (training/spt.py).

Both arms use rotary positions (the `spt` recipe's), so only the pretraining differs, and
the same seed, batch and optimizer settings. Each run's test accuracy is that of its best
validation checkpoint, as eval.py scores it; the table gives every seed and the mean and
sample standard deviation over seeds. Runs are ordinary workdirs under
WORKDIR/<task>/<arm>_seed<N>; rerunning the command resumes or skips them.

Writes spt.md, spt.csv and spt.json.
"""

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Sequence

from efficient_transformers import paths
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError

ARMS = ("scratch", "spt")
TASKS = ("listops", "pathfinder", "text", "image", "pathx")
COLUMNS = (
  ("task", "task", "s"),
  ("arm", "arm", "s"),
  ("steps", "steps (pretrain + fine-tune)", "s"),
  ("seeds", "test accuracy per seed", "s"),
  ("mean", "mean", ".4f"),
  ("std", "std", ".4f"),
)
CSV_KEYS = ("task", "arm", "steps", "seeds", "mean", "std")


def arm_config(task: str, arm: str, *, smoke: bool, seed: int, steps: int, fraction: float):
  """The config of one run: the task's config with `spt` for the spt arm, --steps in all."""
  from efficient_transformers.benchmarks.lra import load_task_config

  arg = ",".join(["smoke"] * smoke + ["spt"])  # Both arms: the recipe's positions.
  c = copy.deepcopy(load_task_config(task, arg))
  pretrain = int(round(steps * fraction)) if arm == "spt" else 0
  with c.unlocked():
    c.seed = seed
    c.spt.pretrain_steps = pretrain
    c.num_train_steps = steps - pretrain
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(c.num_train_steps // 10, 1))
    for key in ("eval_every_steps", "checkpoint_every_steps"):
      c[key] = min(c[key], c.num_train_steps)
  return c


def run_arm(config, workdir) -> float:
  """Trains (or resumes) one run and returns its test accuracy (best checkpoint)."""
  from efficient_transformers.training import eval_lib
  from efficient_transformers.training.train_lib import train_and_evaluate

  train_and_evaluate(config, workdir)
  results = eval_lib.evaluate_checkpoint(config, workdir)
  return float(results["test"]["accuracy"])


def summarize(task: str, arm: str, accuracies: Sequence[float], steps: str) -> dict:
  """One table row: the seeds' accuracies, their mean and sample standard deviation."""
  std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
  return {
    "task": task,
    "arm": arm,
    "steps": steps,
    "seeds": ", ".join(f"{a:.4f}" for a in accuracies),
    "accuracies": list(accuracies),
    "mean": statistics.fmean(accuracies),
    "std": std,
  }


# What the plan divides FLOPs by: a stated sustained rate, not a measurement. An H200's dense
# bf16 peak is 989 TFLOP/s; 30% of it is what a well-tuned Transformer step commonly sustains.
PLAN_TFLOPS = 300.0
PLAN_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


def plan_rows(tasks: Sequence[str], tflops: float) -> list[dict]:
  """The full six-task grid's cost with and without self-pretraining, from the compiled
  train steps' FLOPs (XLA's cost analysis of `train.py --dry_run`) at `tflops`."""
  from efficient_transformers.benchmarks.lra import load_task_config
  from efficient_transformers.training import train_lib

  rows = []
  for task in tasks:
    for arm in ARMS:
      arg = "spt" if arm == "spt" else ""
      try:
        config = load_task_config(task, arg)
        report_ = train_lib.dry_run(config)
      except ConfigError as e:  # Retrieval's dual encoder: not pretrained yet.
        rows.append({"task": task, "arm": arm, "error": e.message})
        continue
      stages = [report_["pretrain"], report_] if "pretrain" in report_ else [report_]
      steps = (
        [config.spt.pretrain_steps, config.num_train_steps]
        if arm == "spt"
        else [config.num_train_steps]
      )
      flops = sum(st.get("flops", float("nan")) * n for st, n in zip(stages, steps, strict=True))
      rows.append(
        {
          "task": task,
          "arm": arm,
          "steps": " + ".join(map(str, steps)),
          "flops_per_step": stages[-1].get("flops"),
          "total_pflops": flops / 1e15,
          "hours": flops / (tflops * 1e12) / 3600,
          "command": f"python train.py --config=configs/lra/{task}.py"
          + (":spt" if arm == "spt" else "")
          + f" --workdir=workdirs/{task}_{arm}",
        }
      )
  return rows


PLAN_COLUMNS = (
  ("task", "task", "s"),
  ("arm", "arm", "s"),
  ("steps", "steps", "s"),
  ("flops_per_step", "FLOPs / step (fine-tune)", ".3g"),
  ("total_pflops", "total PFLOPs", ".1f"),
  ("hours", "hours", ".2f"),
  ("command", "command", "s"),
)


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  return benchmark(argv)


def benchmark(argv: Sequence[str] | None, *, run=run_arm) -> int:
  """The command, each run made by `run(config, workdir) -> test accuracy`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", default="listops,pathfinder")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=400, help="total steps of each run")
  parser.add_argument("--pretrain_fraction", type=float, default=0.5)
  parser.add_argument("--smoke", action="store_true", help="the configs' smoke variants")
  parser.add_argument("--workdir", default=None, help="runs go in WORKDIR/<task>/<arm>_seed<N>")
  report.add_out_flag(parser, "spt.md, spt.csv and spt.json")
  parser.add_argument(
    "--dry_run", action="store_true", help="check the flags and every run's config; train nothing"
  )
  parser.add_argument(
    "--plan",
    action="store_true",
    help="no training: the full six-task grid's cost, scratch and SPT, from compiled FLOPs",
  )
  parser.add_argument("--plan_tflops", type=float, default=PLAN_TFLOPS, help="sustained TFLOP/s")
  args = parser.parse_args(argv)
  if args.plan:
    out = report.prepare_out(args.out)
    if args.dry_run:  # The configs load; nothing is compiled.
      from efficient_transformers.benchmarks.lra import load_task_config

      for task in PLAN_TASKS:
        load_task_config(task, "spt")
      print(report.dry_run_line(f"the plan's {len(PLAN_TASKS)} task configs load", out))
      return 0
    rows = plan_rows(PLAN_TASKS, args.plan_tflops)
    header = (
      "The full LRA grid (softmax attention, each task's full config), from scratch and with "
      "self-pretraining: train-step FLOPs from XLA's cost analysis of the compiled step, "
      f"times the steps, at an assumed sustained {args.plan_tflops:g} TFLOP/s (an H200's dense "
      "bf16 peak is 989). Compiled on "
      f"{report.device_line(cpu=True)}"
    )
    table = report.markdown_table(rows, PLAN_COLUMNS, header, error_column=2)
    print(table)
    if out:
      report.write_tables(out, "spt_plan", table, rows, [k for k, _, _ in PLAN_COLUMNS])
    return 0
  if not args.workdir:
    raise ConfigError("--workdir is required: the runs go there (--plan needs none).")
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise ConfigError(f"--tasks: unknown {', '.join(unknown)}; valid: {', '.join(TASKS)}.")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    seeds = []
  if not seeds or min(seeds) < 0:
    raise ConfigError(f"--seeds must be comma-separated integers >= 0; got {args.seeds!r}.")
  if not 0.0 < args.pretrain_fraction < 1.0:
    raise ConfigError(f"--pretrain_fraction must be in (0, 1); got {args.pretrain_fraction}.")
  report.check_positive(args, ("steps",))
  out = report.prepare_out(args.out)
  root = paths.resolve(args.workdir, what="--workdir")
  if args.dry_run:  # Every run's config builds and its model shapes resolve.
    from efficient_transformers.data import tasks as task_specs
    from efficient_transformers.training import state

    for task in tasks:
      for arm in ARMS:
        c = arm_config(
          task, arm, smoke=args.smoke, seed=seeds[0], steps=args.steps,
          fraction=args.pretrain_fraction,
        )  # fmt: skip
        state.make_setup(c, task_specs.describe(c))
    print(report.dry_run_line(f"{len(tasks) * len(ARMS) * len(seeds)} runs configured", out))
    return 0
  rows = []
  for task in tasks:
    for arm in ARMS:
      accuracies = []
      for seed in seeds:
        config = arm_config(
          task, arm, smoke=args.smoke, seed=seed, steps=args.steps, fraction=args.pretrain_fraction
        )
        accuracies.append(run(config, str(root / task / f"{arm}_seed{seed}")))
      pretrain = config.spt.pretrain_steps
      rows.append(summarize(task, arm, accuracies, f"{pretrain} + {config.num_train_steps}"))
      print(f"{task} {arm}: {rows[-1]['seeds']}", flush=True)
  header = (
    f"From scratch against self-pretraining then fine-tuning, {args.steps} steps in all per "
    f"run, seeds {', '.join(map(str, seeds))}"
    + (", smoke configs" if args.smoke else "")
    + f"; test accuracy of the best validation checkpoint. {report.device_line(cpu=True)}"
  )
  table = report.markdown_table(rows, COLUMNS, header)
  print(table)
  if out:
    report.write_tables(out, "spt", table, rows, CSV_KEYS)
    with paths.writing(f"--out={out}"):
      paths.write_text(out / "spt.json", json.dumps(rows, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
