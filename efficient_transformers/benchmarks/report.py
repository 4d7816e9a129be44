"""What every benchmark command shares around its measurements: flags in, tables out.

The benchmarks (attention, memory, lm_attention, stack_options, exact_memory)
each measure their own thing; around that they all

- take `--out`, a directory that may be relative, absolute or gs://BUCKET/DIR,
  checked (created, writable) before anything is measured: `add_out_flag`,
  `prepare_out`;
- check integer flags the same way: `positive_ints`, `check_positive`,
  `check_divisible`;
- name the device and the JAX version in their tables' headers: `device_line`;
- render rows as a markdown table and write it as NAME.md beside NAME.csv
  through `efficient_transformers.paths`: `markdown_table`, `write_tables`;
- print a UserError as one line `error: MESSAGE` and exit with status 2:
  `one_line_errors`.

A table's columns are `(row key, column title, format spec)` triples; spec "s"
is a left-aligned text column, any other spec (`"d"`, `".2f"`) a right-aligned
number, and a missing or None value is shown as "-".
"""

import argparse
import csv
import functools
import io
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
from etils import epath

from efficient_transformers import paths
from efficient_transformers.errors import ConfigError, UserError
from efficient_transformers.training import workdir as workdir_lib

Column = tuple[str, str, str]

# ---------------------------------------------------------------- Flags.


def add_out_flag(parser: argparse.ArgumentParser, files: str) -> None:
  """Adds `--out` (default None: print only); `files` names what lands there ("NAME.md")."""
  parser.add_argument(
    "--out", default=None, help=f"directory for {files}: relative, absolute or gs://BUCKET/DIR"
  )


def prepare_out(out: str | None, *, what: str = "--out") -> epath.Path | None:
  """`out` resolved, created and checked writable now, not after the measurements.

  Returns:
    The directory (absolute, or a gs:// URL), or None if `out` is None or empty.

  Raises:
    ConfigError: a URL of another scheme than gs://.
    WorkdirIOError: `out` is a file, lies under a file, or is not writable; one
      line naming `what`.
  """
  if not out:
    return None
  try:
    return workdir_lib.prepare(out, what=what)
  except paths.WorkdirIOError as e:
    # prepare names the flag where `out` is a file, and only the path where mkdir or
    # its write test fails (its messages start with the path): say which flag it was.
    message = str(e)
    raise paths.WorkdirIOError(
      e.errno, message if message.startswith(what) else f"{what}={message}"
    ) from None


def dry_run_line(summary: str, out: epath.Path | None) -> str:
  """What a --dry_run prints: `Dry run: SUMMARY; OUT is writable.` (without OUT if None)."""
  return f"Dry run: {summary}" + (f"; {out} is writable." if out else ".")


def positive_ints(text: str, flag: str) -> list[int]:
  """The comma-separated positive integers of `flag`'s value `text`; a ConfigError otherwise."""
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    values = []
  if not values or min(values) <= 0:
    raise ConfigError(f"{flag}={text!r}: give positive integers separated by commas.")
  return values


def check_positive(args: argparse.Namespace, flags: Sequence[str]) -> None:
  """Raises a ConfigError naming the first of `flags` (attribute names) that is not > 0."""
  for flag in flags:
    if getattr(args, flag) <= 0:
      raise ConfigError(f"--{flag}={getattr(args, flag)} must be a positive integer.")


def check_divisible(args: argparse.Namespace, flag: str, by: str) -> None:
  """Raises a ConfigError unless --`flag` is a multiple of --`by`."""
  if getattr(args, flag) % getattr(args, by):
    raise ConfigError(
      f"--{flag}={getattr(args, flag)} must be divisible by --{by}={getattr(args, by)}."
    )


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
  """Wraps a command's `main(argv) -> status`: a UserError prints `error: MESSAGE` and returns 2.

  Everything a user can get wrong (a flag, --out, a disk that fills while the
  tables are written) is a UserError with a message naming the thing to fix,
  so the user sees that line and no stack trace.
  """

  @functools.wraps(main)
  def wrapper(argv: Sequence[str] | None = None) -> int:
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2

  return wrapper


# ---------------------------------------------------------------- The device.


def device_info() -> dict:
  """The first device's kind and platform and the number of devices, as the CSVs name them."""
  device = jax.devices()[0]
  return {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "num_devices": jax.device_count(),
  }


def cpu_model() -> str:
  """The CPU's model name (lscpu's "Model name"), or "" where lscpu cannot tell."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return ""
  return next(
    (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
    "",
  )


def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity, e.g. under `taskset`).

  As many threads as JAX's CPU client starts; os.cpu_count() where affinity is unknown.
  """
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def device_name(*, count: bool = False, cpu: bool = False, info: Mapping | None = None) -> str:
  """The device as a table names it: `KIND (PLATFORM)`, e.g. `NVIDIA H100 (gpu)`.

  Args:
    count: add the number of devices: `KIND (PLATFORM, N device(s))`.
    cpu: name a CPU by its model and cores, `CPU MODEL, N cores (cpu)`, since its
      device kind is only "cpu" (other devices as with `count`).
    info: `device_info()`'s dict; by default this process's devices.
  """
  info = info or device_info()
  if cpu and info["platform"] == "cpu":
    return f"CPU {cpu_model() or 'unknown model'}, {usable_cpus()} cores (cpu)"
  devices = f", {info['num_devices']} device(s)" if count or cpu else ""
  return f"{info['device_kind']} ({info['platform']}{devices})"


def device_line(*, count: bool = False, cpu: bool = False) -> str:
  """`Device: NAME, jax VERSION.`, the sentence every table header ends or goes on from."""
  return f"Device: {device_name(count=count, cpu=cpu)}, jax {jax.__version__}."


# ---------------------------------------------------------------- Figures.


def write_png(fig, path, *, dpi: int = 110) -> None:
  """Writes matplotlib figure `fig` to `path` (local or gs://) as a PNG, whole, and closes it."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  plt.close(fig)
  paths.write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- Tables.


def markdown_table(
  rows: Sequence[Mapping],
  columns: Sequence[Column],
  header: str,
  notes: Sequence[str] = (),
  *,
  error_column: int | None = None,
) -> str:
  """`header`, a blank line, the table of `rows`, then `notes` as a bulleted list.

  Args:
    rows: one dict a table row.
    columns: (key, title, spec) per column; spec "s" is left-aligned text.
    header: the paragraph above the table (what was measured, where).
    notes: lines below it, each shown as `- NOTE`.
    error_column: where a row with an "error" key shows `error: MESSAGE`, the
      cells before formatted as usual and those after left empty; None formats
      such rows like any other.
  """
  lines = [header, "", "| " + " | ".join(title for _, title, _ in columns) + " |"]
  lines.append("|" + "|".join("---" if spec == "s" else "---:" for _, _, spec in columns) + "|")
  for r in rows:
    cells = ["-" if r.get(key) is None else format(r[key], spec) for key, _, spec in columns]
    if error_column is not None and "error" in r:
      cells = cells[:error_column] + [f"error: {r['error']}"]
      cells += [""] * (len(columns) - len(cells))
    lines.append("| " + " | ".join(cells) + " |")
  if notes:
    lines += ["", *(f"- {note}" for note in notes)]
  return "\n".join(lines)


def csv_text(rows: Sequence[Mapping], keys: Sequence[str]) -> str:
  """`rows` as CSV with the columns `keys` (a key a row lacks is an empty cell)."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(keys))
  writer.writeheader()
  writer.writerows({k: r.get(k) for k in keys} for r in rows)
  return buffer.getvalue()


def write_tables(
  out: "str | os.PathLike",
  name: str,
  markdown: str,
  rows: Sequence[Mapping],
  keys: Sequence[str],
  *,
  what: str = "--out",
) -> tuple[epath.Path, epath.Path]:
  """Writes `markdown` to OUT/NAME.md and `rows` (columns `keys`) to OUT/NAME.csv.

  Each file is written whole (`paths.write_text`). `out` may be relative,
  absolute or gs://; it is created if missing.

  Returns:
    The paths of the .md and the .csv.

  Raises:
    WorkdirIOError: a cause the user can fix (`out` under a file, read-only, a
      full disk), as one line naming `what`.
  """
  directory = paths.resolve(out, what=what)
  md_path, csv_path = directory / f"{name}.md", directory / f"{name}.csv"
  with paths.writing(f"{what}={directory}"):
    directory.mkdir(parents=True, exist_ok=True)
    paths.write_text(md_path, markdown + "\n")
    paths.write_text(csv_path, csv_text(rows, keys))
  return md_path, csv_path
