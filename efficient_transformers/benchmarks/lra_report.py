"""The LRA suite's report: per-cell records -> LRA Table 1 (markdown, CSV) and its plot.

Used by `efficient_transformers.benchmarks.lra` (which runs the cells); kept
apart so the runner and the report each stay readable.
"""

import csv
import io
import json
import statistics
import sys
from collections.abc import Sequence

from etils import epath

from efficient_transformers import attention, paths
from efficient_transformers.benchmarks import report

# LRA's order; Table 1's average is over the first five (every model FAILed Path-X).
TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
AVERAGED_TASKS = TASKS[:5]
TASK_TITLES = {
  "listops": "ListOps",
  "text": "Text",
  "retrieval": "Retrieval",
  "image": "Image",
  "pathfinder": "Pathfinder",
  "pathx": "Path-X",
}

# LRA Table 1 (Tay et al. 2020; /work/shared/LRA_REFERENCE.md), test accuracy in %,
# in TASKS order; None = FAIL.
PUBLISHED = {
  "Transformer": (36.37, 64.27, 57.46, 42.44, 71.40, None),
  "Local Attention": (15.82, 52.98, 53.39, 41.46, 66.63, None),
  "Sparse Trans.": (17.07, 63.58, 59.59, 44.24, 71.71, None),
  "Longformer": (35.63, 62.85, 56.89, 42.22, 69.71, None),
  "Linformer": (35.70, 53.94, 52.27, 38.56, 76.34, None),
  "Reformer": (37.27, 56.10, 53.40, 38.07, 68.50, None),
  "Sinkhorn Trans.": (33.67, 61.20, 53.83, 41.23, 67.45, None),
  "Synthesizer": (36.99, 61.68, 54.67, 41.61, 69.45, None),
  "BigBird": (36.05, 64.02, 59.29, 40.83, 74.87, None),
  "Linear Trans.": (16.13, 65.90, 53.09, 42.34, 75.30, None),
  "Performer": (18.01, 65.40, 53.82, 42.77, 77.05, None),
}
# Our attention names -> LRA's model names; the exact variants compute Transformer's attention.
LRA_NAMES = {
  "softmax": "Transformer",
  "dot_product": "Transformer",
  "memory_efficient": "Transformer",
  "local": "Local Attention",
  "sparse": "Sparse Trans.",
  "longformer": "Longformer",
  "linformer": "Linformer",
  "reformer": "Reformer",
  "sinkhorn": "Sinkhorn Trans.",
  "synthesizer": "Synthesizer",
  "bigbird": "BigBird",
  "linear": "Linear Trans.",
  "performer": "Performer",
}


# A self-pretrained row (the runner's --spt): NAME+spt, in WORKDIR/<task>/NAME+spt.
SPT_SUFFIX = "+spt"


def row_name(attention_name: str, spt: bool) -> str:
  """A row's (and its cells' directory's) name: the attention, +spt when self-pretrained."""
  return attention_name + SPT_SUFFIX * spt


def lra_name(row: str) -> str:
  """LRA's model name for a row ('Transformer + SPT' for softmax+spt), or '-'."""
  base = row.removesuffix(SPT_SUFFIX)
  name = LRA_NAMES.get(base, "-")
  return f"{name} + SPT" if row != base and name != "-" else name


def published(attention_name: str, task: str) -> float | None:
  """LRA's Table 1 test accuracy (%) for our attention on `task`; None if there is none
  (as for every self-pretrained row: Table 1 trained from scratch)."""
  row = PUBLISHED.get(LRA_NAMES.get(attention_name, ""))
  return row[TASKS.index(task)] if row and task in TASKS else None


def _read_json(path) -> dict | None:
  try:
    text = paths.read_text(path)
    return None if text is None else json.loads(text)
  except (OSError, ValueError):
    return None


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _fresh_test_results(workdir) -> dict | None:
  """results.json if it is the best checkpoint's test evaluation, made after the last training."""
  path = epath.Path(workdir) / "results.json"
  results = _read_json(path)
  if not results or results.get("checkpoint") != "best" or "test" not in results:
    return None
  # A self-pretrained cell's training writes in its fine-tuning stage's workdir.
  for metrics in (
    epath.Path(workdir) / "metrics.jsonl",
    epath.Path(workdir) / "finetune" / "metrics.jsonl",
  ):
    if metrics.exists() and path.stat().mtime < metrics.stat().mtime:
      return None  # Evaluated before training went on.
  return results


# ---------------------------------------------------------------- Report.


def collect(root: str, tasks: Sequence[str] = (), attentions: Sequence[str] = ()) -> list[dict]:
  """Every cell under `root` (finished, failed or pending) plus the grid `tasks` x `attentions`."""
  found = {}
  root = epath.Path(root)
  if root.is_dir():
    for task_dir in sorted(root.iterdir(), key=lambda p: p.name):
      if not task_dir.is_dir():
        continue
      task = task_dir.name
      for workdir in sorted(task_dir.iterdir(), key=lambda p: p.name):
        name = workdir.name
        record = _read_json(workdir / "cell.json")
        if record is None or not _fresh_test_results(workdir):
          record = _read_json(workdir / "failed.json")
        if record is not None:
          found[(task, name)] = record
  for task in tasks:
    for name in attentions:
      found.setdefault((task, name), {"task": task, "attention": name, "status": "pending"})
  task_rank = {t: i for i, t in enumerate(dict.fromkeys([*tasks, *TASKS]))}
  att_order = dict.fromkeys([*attentions, *LRA_NAMES, *attention.available()])  # LRA's rows.
  att_rank = {a: i for i, a in enumerate(att_order)}
  base = lambda name: name.removesuffix(SPT_SUFFIX)  # A self-pretrained row after its own.
  return sorted(
    found.values(),
    key=lambda r: (
      att_rank.get(base(r["attention"]), len(att_rank)),
      base(r["attention"]),
      r["attention"].endswith(SPT_SUFFIX),
      task_rank.get(r["task"], len(task_rank)),
      r["task"],
    ),
  )


def _fmt(value: float | None, spec: str = ".2f") -> str:
  return "-" if value is None else format(value, spec)


def table1_rows(cells: list[dict]) -> tuple[list[str], list[dict]]:
  """(tasks, one row per attention) in Table 1 form: accuracy % per task and the average."""
  tasks = list(dict.fromkeys(c["task"] for c in sorted(cells, key=lambda c: _task_key(c["task"]))))
  rows = []
  for name in dict.fromkeys(c["attention"] for c in cells):
    mine = {c["task"]: c for c in cells if c["attention"] == name}
    row = {"attention": name, "lra_name": lra_name(name), "cells": mine}
    done = [t for t in tasks if mine.get(t, {}).get("status") == "finished"]
    averaged = [t for t in done if t in AVERAGED_TASKS] or [t for t in done if t == "pathx"]
    row["avg"] = _mean([mine[t]["test_accuracy"] * 100 for t in averaged])
    pub = [published(name, t) for t in averaged]
    row["avg_published"] = None if None in pub else _mean(pub)
    row["avg_tasks"] = len(averaged)
    row["avg_of"] = len([t for t in tasks if t in AVERAGED_TASKS] or tasks)
    row["steps_per_sec"] = _mean(
      [mine[t]["steps_per_sec"] for t in done if mine[t].get("steps_per_sec")]
    )
    row["memory_mib"] = _mean([mine[t]["memory_mib"] for t in done if mine[t].get("memory_mib")])
    rows.append(row)
  return tasks, rows


def _task_key(task: str) -> tuple:
  return (TASKS.index(task) if task in TASKS else len(TASKS), task)


def _mean(values: list) -> float | None:
  return statistics.fmean(values) if values else None


def _cell_text(cell: dict | None, pub: float | None) -> str:
  status = (cell or {}).get("status", "pending")
  if status == "finished":
    ours = f"{cell['test_accuracy'] * 100:.2f}"
  else:
    ours = "FAILED" if status == "failed" else "not run"
  return f"{ours} ({_fmt(pub)})"


def _short(text: str, limit: int = 300) -> str:
  """The first line of an error, cut to `limit` characters (failed.json keeps it whole)."""
  line = text.strip().split("\n")[0]
  return line if len(line) <= limit else line[: limit - 3] + "..."


def _md_escape(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _devices_text(cells: list[dict]) -> str:
  kinds = {
    c.get("device_name")
    or f"{c['device_kind']} ({c.get('platform', '?')}, {c.get('num_devices', '?')} device(s))"
    for c in cells
    if c.get("status") == "finished" and "device_kind" in c
  }
  return "; ".join(sorted(kinds)) or "-"


def markdown(cells: list[dict]) -> str:
  """results.md: Table 1 form, then one line per cell (steps/s, memory, errors)."""
  tasks, rows = table1_rows(cells)
  lines = [
    "# Long Range Arena results",
    "",
    f"Device: {_devices_text(cells)}.",
    "",
    "Test accuracy (%) with the best-validation checkpoint; in parentheses LRA's published "
    "figure (Tay et al. 2020, Table 1) for the matching model ('-': none, e.g. Path-X FAIL). "
    "Avg: mean over the finished tasks (Path-X excluded, as in LRA); its published figure is "
    "the mean over the same tasks. FAILED cells are retried by rerunning the command.",
    *(
      [
        "",
        "Rows NAME+spt: self-pretrained on the task's own training inputs, then fine-tuned "
        "(the `spt` config arg: rotary positions where the attention takes them); Table 1 "
        "has no such figure. Their steps/s and memory are the fine-tuning's.",
      ]
      if any(r["attention"].endswith(SPT_SUFFIX) for r in rows)
      else []
    ),
    "",
    "| Attention | LRA model | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " | Avg |",
    "|---|---|" + "---:|" * (len(tasks) + 1),
  ]
  for row in rows:
    cells_text = [_cell_text(row["cells"].get(t), published(row["attention"], t)) for t in tasks]
    avg = "-"
    if row["avg"] is not None:
      avg = f"{row['avg']:.2f} ({_fmt(row['avg_published'])})"
      if row["avg_tasks"] < row["avg_of"]:
        avg += f" [{row['avg_tasks']}/{row['avg_of']} tasks]"
    lines.append(
      f"| {row['attention']} | {row['lra_name']} | " + " | ".join(cells_text) + f" | {avg} |"
    )
  lines += [
    "",
    "## Cells",
    "",
    "Steps/s: median over the logged training intervals after the first. Memory: XLA's "
    "compiled train step per device, temporaries + arguments. Wall: all attempts, training "
    "and test evaluation.",
    "",
    "| Task | Attention | Status | Test acc | Best val acc @ step | Steps/s | Memory MiB | "
    "Wall s | Device | Error |",
    "|---|---|---|---:|---:|---:|---:|---:|---|---|",
  ]
  for c in sorted(cells, key=lambda c: _task_key(c["task"])):  # Stable: attentions as given.
    best = "-"
    if c.get("best_val_accuracy") is not None:
      best = f"{c['best_val_accuracy'] * 100:.2f} @ {c['best_step']}"
    test = c.get("test_accuracy")
    lines.append(
      f"| {c['task']} | {c['attention']} | {c['status']} | "
      f"{_fmt(test and test * 100)} | {best} | {_fmt(c.get('steps_per_sec'))} | "
      f"{_fmt(c.get('memory_mib'), '.1f')} | {_fmt(c.get('wall_s'), '.0f')} | "
      f"{_md_escape(c.get('device_kind', '-'))} | {_md_escape(_short(c.get('error', '')))} |"
    )
  return "\n".join(lines) + "\n"


CELL_KEYS = (
  "task", "attention", "status", "test_accuracy", "test_loss", "best_val_accuracy", "best_step",
  "num_train_steps", "steps_per_sec", "memory_mib", "temp_mib", "argument_mib", "xla_peak_mib",
  "num_params", "wall_s", "device_kind", "platform", "num_devices", "pretrain_steps",
  "pretrain_objective", "pretrain_steps_per_sec", "pretrain_val_token_accuracy", "error",
)  # fmt: skip


def write_csvs(cells: list[dict], root: str) -> None:
  """results.csv (Table 1 form; FAILED / empty for a failed / missing cell), results_cells.csv."""
  tasks, rows = table1_rows(cells)
  keys = ["attention", "lra_name"]
  for t in tasks:
    keys += [t, f"{t}_published"]
  keys += ["avg", "avg_published", "avg_num_tasks", "steps_per_sec", "memory_mib"]
  root = epath.Path(root)
  with io.StringIO(newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    for row in rows:
      out = {k: row.get(k) for k in ("attention", "lra_name", "avg", "avg_published")}
      out.update(avg_num_tasks=row["avg_tasks"], steps_per_sec=row["steps_per_sec"])
      out["memory_mib"] = row["memory_mib"]
      for t in tasks:
        c = row["cells"].get(t, {})
        status = c.get("status")
        out[t] = (
          c["test_accuracy"] * 100 if status == "finished" else {"failed": "FAILED"}.get(status)
        )
        out[f"{t}_published"] = published(row["attention"], t)
      writer.writerow({k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in out.items()})
    paths.write_text(root / "results.csv", f.getvalue())
  with io.StringIO(newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CELL_KEYS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(cells)
    paths.write_text(root / "results_cells.csv", f.getvalue())


def plot(cells: list[dict], path: str) -> bool:
  """LRA's Figure-3 style: average accuracy against steps/s, bubble area = peak memory."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    _log("matplotlib is not installed; skipping the plot.")
    return False
  _, rows = table1_rows(cells)
  rows = [r for r in rows if r["avg"] is not None and r["steps_per_sec"]]
  fig, ax = plt.subplots(figsize=(7, 5))
  largest = max((r["memory_mib"] or 0 for r in rows), default=0) or 1
  for r in rows:
    size = 200 + 2000 * (r["memory_mib"] or 0) / largest
    ax.scatter(r["steps_per_sec"], r["avg"], s=size, alpha=0.5)
    label = f"{r['attention']}\n{_fmt(r['memory_mib'], '.0f')} MiB"
    ax.annotate(label, (r["steps_per_sec"], r["avg"]), ha="center", va="center", fontsize=8)
  ax.set_xlabel("training steps/s (mean over tasks)")
  ax.set_ylabel("test accuracy, average over tasks (%)")
  ax.set_title(f"LRA: accuracy vs speed, bubble area = memory\n{_devices_text(cells)}", fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.margins(0.2)
  report.write_png(fig, path, dpi=120)
  return True


def write_report(root: str, tasks: Sequence[str] = (), attentions: Sequence[str] = ()) -> str:
  """Writes results.md, results.csv, results_cells.csv and results_plot.png; returns the table."""
  root = epath.Path(root)
  cells = collect(root, tasks, attentions)
  root.mkdir(parents=True, exist_ok=True)
  table = markdown(cells)
  paths.write_text(root / "results.md", table)
  write_csvs(cells, root)
  plot(cells, root / "results_plot.png")
  return table
