r"""Accuracy against size and speed: every compression of one trained model, side by side.

    python -m efficient_transformers.benchmarks.compression \
        --config=configs/lra/listops.py:smoke --workdir=workdirs/listops_smoke \
        --out=benchmarks_out/compression

From the trained run in --workdir (the base), the rows:

  base                the trained model, float32
  student_scratch     a --student_layers-layer model of the same width trained from scratch
                      for --student_steps (default: the config's num_train_steps)
  student_distilled   the same student, same steps and seed, distilled from the base
                      (config.distill, T = --temperature, alpha = --alpha)
  ptq_int8_weights    post-training int8 weights (qwix), float activations
  ptq_int8            post-training int8 weights and activations
  qat_int8            the base fine-tuned --finetune_steps with quantization-aware training
                      (config.model.quantization=int8), then stored as int8 (PTQ of the
                      QAT weights)
  pruned_50/80/90     the base fine-tuned --finetune_steps under gradual magnitude pruning
                      (config.pruning) to 50, 80 and 90 % sparsity
  heads_pruned        --prune_heads of the attention heads removed by importance (Michel
                      et al. 2019, on the validation split), no fine-tuning

Every row is scored on the test split by one evaluation loop (single device, the whole
split). Columns: test accuracy and its change from the base in points; parameters
(nonzero ones for pruned rows); bytes as stored (int8 values and their scales for
quantized rows; 4 bytes per nonzero weight for pruned rows, index overhead not counted:
what a sparse format could reach, not what the dense arrays here take); the forward time
of one test batch of config.batch_size, median of --repeats calls interleaved across the
rows (a drifting load slows them alike), and its ratio to the base's, measured in the same
run on this machine. Pruned weights are zeros in dense arrays, so
they change no time here. Fine-tuning and student runs are ordinary train.py runs under
OUT/runs/, kept for inspection (`python eval.py` scores them too).

Writes compression.md (the table), compression.csv, compression.json and
compression.png (accuracy against bytes, and against forward time).
"""

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers import paths
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError

ROWS = (
  "base",
  "student_scratch",
  "student_distilled",
  "ptq_int8_weights",
  "ptq_int8",
  "qat_int8",
  "pruned_50",
  "pruned_80",
  "pruned_90",
  "heads_pruned",
)
COLUMNS = (
  ("row", "row", "s"),
  ("method", "method", "s"),
  ("accuracy", "test accuracy", ".4f"),
  ("delta_points", "vs base (points)", "+.1f"),
  ("params", "parameters", ",d"),
  ("bytes", "bytes", ",d"),
  ("bytes_ratio", "bytes vs base", ".3f"),
  ("forward_ms", "forward ms / batch", ".2f"),
  ("time_ratio", "time vs base", ".2f"),
)
CSV_KEYS = (*(key for key, _, _ in COLUMNS), "sparsity", "heads_per_layer", "workdir")


# ---------------------------------------------------------------- Scoring one model.


def _forward(model: nnx.Module):
  """A jitted forward of `model` (deterministic): (state, *inputs) -> logits, and its state."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, *inputs):
    return nnx.merge(graphdef, state)(*inputs, deterministic=True)

  return forward, state


def score(model: nnx.Module, task, config, *, split: str = "test"):
  """Test accuracy of `model` over the whole split, and a timer of its forward on one batch
  (a zero-argument call returning seconds)."""
  from efficient_transformers.data import pipeline

  forward, state = _forward(model)
  names = model.input_names
  correct = count = 0.0
  first = None
  for batch in pipeline.task_eval_batches(
    task, split, global_batch_size=config.batch_size, process_index=0, process_count=1
  ):
    inputs = [jnp.asarray(batch[n]) for n in names]
    first = first or inputs
    logits = np.asarray(forward(state, *inputs))
    weight = np.asarray(batch["weight"])
    correct += float(np.sum((logits.argmax(-1) == np.asarray(batch["targets"])) * weight))
    count += float(np.sum(weight))

  def timer() -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(forward(state, *first))
    return time.perf_counter() - t0

  return correct / max(count, 1.0), timer


def time_rows(timers: list, repeats: int) -> list[float]:
  """The median seconds of each timer, the calls interleaved round by round, so that a
  machine whose load drifts slows every row alike and the ratios stay fair."""
  times = [[] for _ in timers]
  for _ in range(repeats):
    for i, timer in enumerate(timers):
      times[i].append(timer())
  return [float(np.median(t)) for t in times]


def float_size(model: nnx.Module) -> dict:
  """Parameters, nonzero parameters, and their bytes (4 per nonzero float32 weight)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  params = sum(int(x.size) for x in leaves)
  nonzero = sum(int(np.count_nonzero(np.asarray(x))) for x in leaves)
  prunable = [np.asarray(x) for x in leaves if x.ndim >= 2]
  zeros = sum(int(x.size - np.count_nonzero(x)) for x in prunable)
  sparsity = zeros / max(sum(x.size for x in prunable), 1)
  return {"params": params, "nonzero": nonzero, "sparsity": sparsity, "bytes": 4 * nonzero}


# ---------------------------------------------------------------- Runs.


def _variant(config, **changes):
  """A copy of `config` with dotted keys changed (e.g. {"pruning.final_sparsity": 0.5})."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for dotted, value in changes.items():
      node = c
      *parents, key = dotted.split(".")
      for p in parents:
        node = node[p]
      node[key] = value
  return c


def _train(config, workdir: str) -> None:
  from efficient_transformers.training.train_lib import train_and_evaluate

  train_and_evaluate(config, workdir)


def _finetune(config, base_workdir: str, steps: int, **changes):
  """The base's config fine-tuned from its checkpoint for `steps` (a short warmup)."""
  return _variant(
    config,
    init_from=str(base_workdir),
    num_train_steps=steps,
    # One evaluation, at the end: a pruned run's best checkpoint would otherwise be an
    # earlier, less sparse one. The rows read its latest checkpoint.
    eval_every_steps=steps,
    checkpoint_every_steps=steps,
    log_every_steps=max(min(config.log_every_steps, steps // 4), 1),
    **{"optimizer.warmup_steps": min(config.optimizer.warmup_steps, max(steps // 10, 1))},
    **changes,
  )


def run(args, config, out) -> list[dict]:
  from efficient_transformers.data import tasks
  from efficient_transformers.training import eval_lib, head_pruning, quantization

  wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
  base_model, task, setup = eval_lib.restore_model(config, args.workdir)  # Checks the workdir.
  spec = tasks.describe(config)
  runs = out / "runs"
  rows: list[dict] = []

  timers = []

  def add(row, method, model, *, size=None, workdir=None, **extra):
    accuracy, timer = score(model, task, config)
    timers.append(timer)
    size = size or float_size(model)
    rows.append(
      {
        "row": row,
        "method": method,
        "accuracy": accuracy,
        "params": size.get("nonzero", size.get("params")),
        "bytes": size["bytes"],
        "sparsity": size.get("sparsity"),
        "workdir": workdir,
        **extra,
      }
    )
    print(f"{row}: accuracy {accuracy:.4f}, {size['bytes']:,} bytes", flush=True)

  add("base", "trained float32", base_model, workdir=str(args.workdir))

  def quantized(model, mode):
    q = quantization.ptq_model(
      model,
      mode,
      quantization.sample_inputs(model, spec.fields, setup.objective),
      what=f"attention {config.model.attention!r}",
    )
    b = quantization.quantized_bytes(q)
    return q, {"params": float_size(model)["params"], "bytes": b["param_bytes"]}

  student_steps = args.student_steps or config.num_train_steps
  student = _variant(
    config, num_train_steps=student_steps, **{"model.num_layers": args.student_layers}
  )
  if "student_scratch" in wanted:
    _train(student, str(runs / "student_scratch"))
    model, _, _ = eval_lib.restore_model(student, runs / "student_scratch")
    add(
      "student_scratch",
      f"{args.student_layers} layer(s), from scratch",
      model,
      workdir="runs/student_scratch",
    )
  if "student_distilled" in wanted:
    distilled = _variant(
      student,
      **{
        "distill.teacher_workdir": str(args.workdir),
        "distill.temperature": args.temperature,
        "distill.alpha": args.alpha,
      },
    )
    _train(distilled, str(runs / "student_distilled"))
    model, _, _ = eval_lib.restore_model(distilled, runs / "student_distilled")
    add(
      "student_distilled",
      f"{args.student_layers} layer(s), distilled (T={args.temperature:g}, alpha={args.alpha:g})",
      model,
      workdir="runs/student_distilled",
    )
  for mode in ("int8_weights", "int8"):
    if f"ptq_{mode}" in wanted:
      q, size = quantized(base_model, mode)
      add(f"ptq_{mode}", f"post-training {mode} (qwix)", q, size=size)
  if "qat_int8" in wanted:
    qat = _finetune(config, args.workdir, args.finetune_steps, **{"model.quantization": "int8"})
    _train(qat, str(runs / "qat_int8"))
    model, _, _ = eval_lib.restore_model(
      _variant(qat, **{"model.quantization": "none"}), runs / "qat_int8"
    )
    q, size = quantized(model, "int8")
    add(
      "qat_int8",
      "quantization-aware fine-tuning, int8",
      q,
      size=size,
      workdir="runs/qat_int8",
    )
  for sparsity in (50, 80, 90):
    row = f"pruned_{sparsity}"
    if row in wanted:
      pruned = _finetune(
        config,
        args.workdir,
        args.finetune_steps,
        **{"pruning.final_sparsity": sparsity / 100, "pruning.frequency": 1},
      )
      _train(pruned, str(runs / row))
      model, _, _ = eval_lib.restore_model(pruned, runs / row, which="latest")
      add(row, f"magnitude pruning to {sparsity}%, fine-tuned", model, workdir=f"runs/{row}")
  if "heads_pruned" in wanted:
    from efficient_transformers.data import pipeline

    batches = pipeline.task_eval_batches(
      task, "validation", global_batch_size=config.batch_size, process_index=0, process_count=1
    )
    importance = head_pruning.head_importance(base_model, setup.objective, batches)
    keep = head_pruning.choose_heads(importance, prune=args.prune_heads)
    model, pruned_config = head_pruning.pruned_model(config, base_model, keep)
    add(
      "heads_pruned",
      f"{args.prune_heads:.0%} of heads removed by importance",
      model,
      heads_per_layer=str(tuple(pruned_config.model.heads_per_layer)),
    )
  for r, seconds in zip(rows, time_rows(timers, args.repeats), strict=True):
    r["forward_ms"] = 1e3 * seconds
  base = rows[0]
  for r in rows:
    r["delta_points"] = 100 * (r["accuracy"] - base["accuracy"])
    r["bytes_ratio"] = r["bytes"] / base["bytes"]
    r["time_ratio"] = r["forward_ms"] / base["forward_ms"]
  return rows


# ---------------------------------------------------------------- Output.


def plot(rows: list[dict], path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, label in (
    (axes[0], "bytes", "bytes as stored (log)"),
    (axes[1], "forward_ms", "forward ms per test batch (log)"),
  ):
    for r in rows:
      ax.scatter(r[key], 100 * r["accuracy"], s=30)
      ax.annotate(r["row"], (r[key], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("test accuracy (%)")
  report.write_png(fig, path)


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="the trained run's config (FILE[:ARGS])")
  parser.add_argument("--workdir", required=True, help="the trained run's workdir (the base)")
  parser.add_argument("--rows", default=",".join(ROWS), help="which rows, comma-separated")
  parser.add_argument("--student_layers", type=int, default=1)
  parser.add_argument("--student_steps", type=int, default=0, help="0: config.num_train_steps")
  parser.add_argument("--temperature", type=float, default=2.0)
  parser.add_argument("--alpha", type=float, default=0.5)
  parser.add_argument("--finetune_steps", type=int, default=100)
  parser.add_argument("--prune_heads", type=float, default=0.5, help="fraction of heads")
  parser.add_argument("--repeats", type=int, default=30, help="timed forward calls per row")
  report.add_out_flag(parser, "compression.md, .csv, .json and .png, and runs/")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="check the flags, the config and --out; read no checkpoint, train nothing",
  )
  args = parser.parse_args(argv)
  if not args.out:
    raise ConfigError("--out is required: the report and its training runs go there.")
  out = report.prepare_out(args.out)
  report.check_positive(args, ("student_layers", "finetune_steps", "repeats"))
  if args.student_steps < 0:
    raise ConfigError(f"--student_steps must be >= 0; got {args.student_steps}.")
  if not 0.0 < args.prune_heads < 1.0:
    raise ConfigError(f"--prune_heads must be a fraction in (0, 1); got {args.prune_heads}.")
  from efficient_transformers.training import cli

  config = cli.load_config(args.config)
  unknown = sorted({r.strip() for r in args.rows.split(",") if r.strip()} - set(ROWS))
  if unknown:
    raise ConfigError(f"--rows: unknown {', '.join(unknown)}; valid: {', '.join(ROWS)}.")
  if args.dry_run:  # The model builds (abstractly) for the config: nothing else is read.
    from efficient_transformers.data import tasks
    from efficient_transformers.training import state

    setup = state.make_setup(config, tasks.describe(config))
    print(report.dry_run_line(f"{args.config} builds ({setup.num_params:,} parameters)", out))
    return 0
  rows = run(args, config, out)
  header = (
    f"Compression of {args.workdir} ({args.config}): test accuracy, size and the forward time "
    f"of one test batch of {config.batch_size}, median of {args.repeats}. Student rows: "
    f"{args.student_layers} layer(s), {args.student_steps or config.num_train_steps} steps; "
    f"fine-tuned rows: {args.finetune_steps} steps from the base. {report.device_line(cpu=True)}"
  )
  notes = [
    "bytes: int8 values plus float32 scales for quantized rows; 4 per nonzero weight for "
    "pruned rows (a sparse format's values, its indices not counted), whose dense arrays "
    "here take the base's bytes and time.",
  ]
  table = report.markdown_table(rows, COLUMNS, header, notes)
  print(table)
  report.write_tables(out, "compression", table, rows, CSV_KEYS)
  with paths.writing(f"--out={out}"):
    paths.write_text(out / "compression.json", json.dumps(rows, indent=2))
    plot(rows, out / "compression.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
