"""The GPU check's report and command line (`python -m ...benchmarks.gpu_check`)."""

import argparse
import csv
import datetime
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence

import jax

from efficient_transformers import attention, paths
from efficient_transformers.benchmarks import attention as bench
from efficient_transformers.benchmarks.gpu_check.common import (
  BUDGETS_S,
  FULL,
  PARTS,
  REDUCED,
  TIME_LIMIT_S,
  Budget,
  _log,
  _short_error,
  device_info,
  peak_tflops,
)
from efficient_transformers.benchmarks.gpu_check.exact import (
  correctness_markdown,
  run_correctness,
  run_tflops,
  tflops_markdown,
)
from efficient_transformers.benchmarks.gpu_check.training import (
  attention_markdown,
  listops_markdown,
  run_attention,
  run_listops,
)
from efficient_transformers.errors import ConfigError, UserError

# ---------------------------------------------------------------- Writing the report.


def write_csv(path, rows: list[dict], info: dict) -> None:
  keys = list(info)
  for r in rows:
    keys += [k for k in r if k not in keys and k != "error"]
  keys.append("error")  # Always a column, so readers need not test for it.
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=keys)
  writer.writeheader()
  writer.writerows({**info, **r} for r in rows)
  paths.write_text(path, buffer.getvalue())


def report_markdown(info: dict, peak: float | None, reduced: bool, sections: dict) -> str:
  peak_text = f"{peak} TFLOP/s dense bf16" if peak else "unknown"
  lines = [
    "# GPU check" + (" (reduced sizes)" if reduced else ""),
    "",
    f"Device: **{info['device_kind']}** (platform {info['platform']}, {info['num_devices']} "
    f"device(s), peak {peak_text}); jax {info['jax_version']}, Python "
    f"{platform.python_version()}; {info['date']}.",
    "",
    "| part | status | seconds | budget s | finished (UTC) |",
    "|---|---|---:|---:|---|",
  ]
  for name, s in sections.items():
    lines.append(
      f"| {name} | {s['status']} | {s['seconds']:.0f} | {s['budget']:.0f} | {s['date']} |"
    )
  for name, s in sections.items():
    lines += ["", f"## {name}", "", s["markdown"]]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Command line.


def _skipped(row: dict) -> bool:
  return row.get("error", "").startswith("skipped")


def _cell_summary(rows: list[dict]) -> str:
  """ ", 2 skipped, 1 failed" for the part's status line ("" when every cell ran)."""
  skipped = sum(_skipped(r) for r in rows)
  failed = sum("error" in r for r in rows) - skipped
  return (f", {skipped} skipped" if skipped else "") + (f", {failed} failed" if failed else "")


class _Parser(argparse.ArgumentParser):
  """Bad flags are one-line ConfigErrors, like every other user error."""

  def error(self, message):
    raise ConfigError(f"{message} (see --help)")


def _names(text: str, valid: Sequence[str], flag: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    raise ConfigError(f"{flag}={text!r}: unknown {unknown or 'empty'}; valid: {', '.join(valid)}.")
  return names


def _lengths(text: str, flag: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    values = []
  if not values or min(values) <= 0:
    raise ConfigError(f"{flag}={text!r}: give positive integers separated by commas.")
  return values


def _budgets(text: str) -> dict[str, float]:
  out = dict(BUDGETS_S)
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, seconds = item.partition("=")
    _names(name, PARTS, "--budgets")
    try:
      out[name] = float(seconds)
    except ValueError:
      raise ConfigError(f"--budgets: {item!r} is not PART=SECONDS.") from None
  return out


def _out_dir(text: str):
  out = paths.resolve(text, what="--out")
  if out.exists() and not out.is_dir():
    raise ConfigError(f"--out={text!r} is a file; give a directory (created if missing).")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise (paths.user_io_error(e, out) or e) from None
  return out


def main(argv: Sequence[str] | None = None) -> int:
  deadline = time.monotonic()
  parser = _Parser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory for the report (local, ~, gs://)")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
  parser.add_argument("--reduced", action="store_true", help="toy sizes (CPU, CI)")
  parser.add_argument("--data_dir", default="", help="ListOps data (default: a temporary dir)")
  parser.add_argument("--listops_steps", type=int, default=None, help="default 200 (reduced 4)")
  parser.add_argument("--attentions", default="", help="part attention's variants (default all)")
  parser.add_argument("--attention_lengths", default="", help="part attention's lengths")
  parser.add_argument("--budgets", default="", help="e.g. attention=300,tflops=60 (seconds)")
  parser.add_argument("--time_limit_s", type=float, default=TIME_LIMIT_S)
  try:
    args = parser.parse_args(argv)
    parts = _names(args.parts, PARTS, "--parts")
    budgets = _budgets(args.budgets)
    sizes = REDUCED if args.reduced else FULL
    names = sizes.attention_names or attention.available()
    if args.attentions:
      names = _names(args.attentions, attention.available(), "--attentions")
    lengths = sizes.attention_lengths
    if args.attention_lengths:
      lengths = _lengths(args.attention_lengths, "--attention_lengths")
    steps = args.listops_steps or sizes.listops_steps
    if steps < 2:
      raise ConfigError(f"--listops_steps={steps}: give at least 2 (the first is not timed).")
    out = _out_dir(args.out)
    data_dir = paths.resolve_local(args.data_dir, what="--data_dir") if args.data_dir else ""
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  deadline += args.time_limit_s
  if args.reduced and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # Toy sizes spend their time compiling; LLVM -O0 (as the tests use) cuts that by about
    # a quarter, and toy timings mean nothing anyway. Read when the backend starts, below.
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
  options = dict(names=names, lengths=lengths, steps=steps)
  try:
    return _run_parts(parts, args.reduced, sizes, budgets, deadline, out, data_dir, **options)
  except OSError as e:  # Writing the report: a full disk, a read-only --out.
    error = paths.user_io_error(e, out)
    if error is None:
      raise
    print(f"error: {error}", file=sys.stderr)
    return 2


def _run_parts(parts, reduced, sizes, budgets, deadline, out, data_dir, *, names, lengths, steps):
  """Runs `parts` in order, rewriting the report after each; returns the exit code."""
  info = device_info()
  peak = peak_tflops(info["device_kind"])
  paths.write_text(out / "environment.txt", jax.print_environment_info(return_string=True))
  previous = paths.read_text(out / "sections.json")
  sections: dict = {}
  if previous:  # A rerun of some parts keeps the others' sections.
    sections = {k: v for k, v in json.loads(previous).items() if k in PARTS}
  correctness_passed, crashed = True, False
  temp_data = None
  for part in parts:
    budget = Budget(budgets[part], deadline)
    status, markdown = "ok", ""
    _log(f"== {part} (budget {budgets[part]:.0f} s)")
    try:
      if part == "correctness":
        rows, correctness_passed, notes = run_correctness(sizes, budget)
        status = "passed" if correctness_passed else "FAILED"
        markdown = correctness_markdown(rows, correctness_passed, notes)
        write_csv(out / "correctness.csv", rows, info)
      elif part == "tflops":
        rows = run_tflops(sizes, budget, peak)
        markdown = tflops_markdown(rows, sizes, peak)
        write_csv(out / "tflops.csv", rows, info)
      elif part == "listops":
        if not data_dir:
          data_dir = temp_data = tempfile.mkdtemp(prefix="gpu_check_listops_")
        rows = run_listops(sizes, budget, peak, data_dir, steps)
        markdown = listops_markdown(rows, steps)
        write_csv(out / "listops.csv", rows, info)
      else:
        rows = run_attention(sizes, budget, names, lengths)
        markdown = attention_markdown(rows, sizes, info)
        paths.write_text(out / "attention.md", markdown + "\n")
        write_csv(out / "attention.csv", rows, info)
        title = f"{info['device_kind']} ({info['platform']}), batch {sizes.attention_batch}, bf16"
        bench.plot(rows, out / "attention.png", title)
      status += _cell_summary(rows)
      if rows and all("error" in r for r in rows) and not all(_skipped(r) for r in rows):
        status = "FAILED" + status[status.index(",") :]  # No cell ran: the part failed.
        crashed = True
    except Exception as e:  # the next part still runs.
      if isinstance(e, UserError | ImportError):
        detail = _short_error(e)
      else:
        detail = traceback.format_exc(limit=-3)
      status = f"error: {_short_error(e)}"
      markdown = f"The part failed:\n\n```\n{detail}\n```"
      _log(f"{part} failed: {detail}")
      if part == "correctness":
        correctness_passed = False
      crashed = True
    sections[part] = dict(
      status=status,
      seconds=budget.elapsed(),
      budget=budgets[part],
      date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
      markdown=markdown,
    )
    paths.write_text(out / "sections.json", json.dumps(sections, indent=1))
    ordered = {p: sections[p] for p in PARTS if p in sections}
    text = report_markdown(info, peak, reduced, ordered)
    paths.write_text(out / "gpu_check.md", text)
  if temp_data:
    shutil.rmtree(temp_data, ignore_errors=True)
  print(text)
  print(f"wrote {out}", file=sys.stderr)
  if not correctness_passed:
    return 1
  return 3 if crashed else 0


if __name__ == "__main__":
  sys.exit(main())
