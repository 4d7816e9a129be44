"""The benchmarks' shared plumbing: tables, --out, the device line, flag checks, one-line errors."""

import argparse
import csv
import os
import pathlib

import jax
import pytest

from efficient_transformers import paths
from efficient_transformers.benchmarks import (
  attention,
  exact_memory,
  lm_attention,
  memory,
  report,
  stack_options,
)
from efficient_transformers.errors import ConfigError

COLUMNS = (("name", "name", "s"), ("length", "L", "d"), ("ms", "ms", ".2f"), ("mib", "MiB", ".1f"))
ROWS = [
  {"name": "softmax", "length": 16, "ms": 1.234, "mib": 5.0},
  {"name": "local", "length": 16, "ms": None, "mib": 2.25, "extra": "not a column"},
  {"name": "bigbird", "length": 32, "error": "block_size 64 does not divide 32"},
]


def _files(root) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def test_markdown_table_matches_a_hand_written_table():
  text = report.markdown_table(ROWS, COLUMNS, "Header line.", ("first note", "second note"))
  assert text == (
    "Header line.\n"
    "\n"
    "| name | L | ms | MiB |\n"
    "|---|---:|---:|---:|\n"
    "| softmax | 16 | 1.23 | 5.0 |\n"
    "| local | 16 | - | 2.2 |\n"
    "| bigbird | 32 | - | - |\n"
    "\n"
    "- first note\n"
    "- second note"
  )


def test_markdown_table_shows_an_error_after_the_rows_key_cells():
  text = report.markdown_table(ROWS, COLUMNS, "H", error_column=2)
  assert text.splitlines()[-1] == "| bigbird | 32 | error: block_size 64 does not divide 32 |  |"
  assert text.splitlines()[-2] == "| local | 16 | - | 2.2 |"  # Rows without "error" unchanged.


def test_write_tables_to_a_relative_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  md, csv = report.write_tables("rel/out", "bench", "# Table", ROWS, ("name", "ms", "error"))
  assert (str(md), str(csv)) == (
    str(tmp_path / "rel" / "out" / "bench.md"),
    str(tmp_path / "rel" / "out" / "bench.csv"),
  )
  assert (tmp_path / "rel" / "out" / "bench.md").read_text() == "# Table\n"
  # csv's own line ends (\r\n), as the committed CSVs have them.
  assert (tmp_path / "rel" / "out" / "bench.csv").read_bytes() == (
    b"name,ms,error\r\nsoftmax,1.234,\r\nlocal,,\r\nbigbird,,block_size 64 does not divide 32\r\n"
  )
  assert _files(tmp_path) == {"rel/out/bench.md", "rel/out/bench.csv"}  # No temporary left.


def test_write_tables_to_an_absolute_directory_it_creates(tmp_path):
  out = tmp_path / "a" / "b"
  report.write_tables(str(out), "bench", "text", ROWS[:1], ("name", "length"))
  assert (out / "bench.md").read_text() == "text\n"
  assert (out / "bench.csv").read_text().splitlines() == ["name,length", "softmax,16"]
  # An existing directory is fine, and the files are replaced whole.
  report.write_tables(out, "bench", "new", [], ("name",))
  assert (out / "bench.md").read_text() == "new\n"
  assert (out / "bench.csv").read_text().splitlines() == ["name"]


def test_write_tables_under_a_file_is_one_line_naming_out(tmp_path):
  (tmp_path / "file").write_text("keep")
  with pytest.raises(paths.WorkdirIOError) as raised:
    report.write_tables(tmp_path / "file" / "sub", "bench", "text", ROWS, ("name",))
  message = str(raised.value)
  assert message.startswith(f"--out={tmp_path / 'file' / 'sub'} ") and "\n" not in message
  assert "inside a file" in message
  assert _files(tmp_path) == {"file"} and (tmp_path / "file").read_text() == "keep"


def test_prepare_out_resolves_creates_and_names_out(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert report.prepare_out(None) is None and report.prepare_out("") is None
  assert str(report.prepare_out("rel/out/")) == str(tmp_path / "rel" / "out")
  assert (tmp_path / "rel" / "out").is_dir() and not list((tmp_path / "rel" / "out").iterdir())
  (tmp_path / "file").write_text("")
  for bad, problem in (("file", "is a file"), ("file/sub", "inside a file")):
    with pytest.raises(paths.WorkdirIOError) as raised:
      report.prepare_out(bad)
    assert str(raised.value).startswith("--out=") and problem in str(raised.value)
  with pytest.raises(ConfigError, match="ftp:// is not supported"):
    report.prepare_out("ftp://host/dir")


# The smallest command line of each benchmark; each checks --out before measuring.
COMMANDS = {
  "attention": (attention.main, ["--attentions=softmax", "--lengths=16", "--dry_run"]),
  "memory": (memory.main, ["--contexts=32"]),
  "lm_attention": (lm_attention.main, ["--attentions=softmax", "--lengths=16", "--dry_run"]),
  "stack_options": (stack_options.main, ["--reversible_layers=1", "--dry_run"]),
  "exact_memory": (exact_memory.main, ["--lengths=16"]),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_each_benchmark_exits_2_with_one_line_for_an_out_under_a_file(
  name, tmp_path, monkeypatch, capsys
):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "file").write_text("")
  main, flags = COMMANDS[name]
  assert main([*flags, "--out=file/sub"]) == 2
  captured = capsys.readouterr()
  assert captured.err == (
    f"error: --out={tmp_path / 'file' / 'sub'} is inside a file, not a directory: "
    "use a directory path.\n"
  )
  assert captured.out == ""
  assert _files(tmp_path) == {"file"}  # Nothing written anywhere else.


def test_exact_memory_writes_its_table_and_csv_to_a_relative_out(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  flags = ["--lengths=16", "--batch=1", "--heads=1", "--head_dim=8", "--out=rel"]
  assert exact_memory.main(flags) == 0
  text = (tmp_path / "rel" / "exact_memory.md").read_text()
  assert text == capsys.readouterr().out.split("\n\nwrote ")[0] + "\n"
  assert f"{report.device_line(cpu=True)} Shape: batch 1" in text
  assert "| L | attention | temp MiB | temp vs softmax | arguments MiB | compile s |" in text
  lines = (tmp_path / "rel" / "exact_memory.csv").read_text().splitlines()
  assert lines[0] == ",".join(exact_memory.CSV_KEYS) and len(lines) == 1 + 3
  assert [line.split(",")[1] for line in lines[1:]][::2] == ["softmax", "memory_efficient"]


def test_device_name_forms(monkeypatch):
  gpu = {"device_kind": "NVIDIA H200", "platform": "gpu", "num_devices": 2}
  assert report.device_name(info=gpu) == "NVIDIA H200 (gpu)"
  assert report.device_name(count=True, info=gpu) == "NVIDIA H200 (gpu, 2 device(s))"
  assert report.device_name(cpu=True, info=gpu) == "NVIDIA H200 (gpu, 2 device(s))"
  cpu = {"device_kind": "cpu", "platform": "cpu", "num_devices": 8}
  assert report.device_name(info=cpu) == "cpu (cpu)"
  # The cores are those this process may use (taskset), not all the machine's.
  monkeypatch.setattr(report.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
  named = report.device_name(cpu=True, info=cpu)
  assert named.startswith("CPU ") and named.endswith(", 3 cores (cpu)")
  # This process: the tests' fake 8-device CPU platform.
  assert report.device_info() == {"device_kind": "cpu", "platform": "cpu", "num_devices": 8}
  assert report.device_line(count=True) == f"Device: cpu (cpu, 8 device(s)), jax {jax.__version__}."


def test_cpu_without_lscpu_is_an_unknown_model(monkeypatch):
  monkeypatch.setattr(report.subprocess, "run", _raise(FileNotFoundError("lscpu")))
  assert report.cpu_model() == ""
  cpu = {"device_kind": "cpu", "platform": "cpu", "num_devices": 1}
  assert report.device_name(cpu=True, info=cpu).startswith("CPU unknown model, ")


def _raise(error):
  def fn(*args, **kwargs):
    raise error

  return fn


def test_flag_checks_name_the_flag():
  assert report.positive_ints("16, 32,", "--lengths") == [16, 32]
  for bad in ("", "0,16", "16,x", "-1"):
    with pytest.raises(ConfigError, match="^--lengths=.*give positive integers"):
      report.positive_ints(bad, "--lengths")
  args = argparse.Namespace(batch=2, steps=0, emb_dim=10, num_heads=4)
  report.check_positive(args, ("batch",))
  with pytest.raises(ConfigError, match=r"^--steps=0 must be a positive integer\.$"):
    report.check_positive(args, ("batch", "steps", "emb_dim"))
  with pytest.raises(ConfigError, match=r"^--emb_dim=10 must be divisible by --num_heads=4\.$"):
    report.check_divisible(args, "emb_dim", "num_heads")
  report.check_divisible(argparse.Namespace(emb_dim=8, num_heads=4), "emb_dim", "num_heads")


def test_one_line_errors_turns_a_user_error_into_exit_2(capsys):
  @report.one_line_errors
  def main(argv=None):
    parser = argparse.ArgumentParser()
    report.add_out_flag(parser, "x.md")
    parser.add_argument("--n", default="1")
    args = parser.parse_args(argv)
    return report.positive_ints(args.n, "--n")[0]

  assert main(["--n=3"]) == 3  # The command's own status passes through.
  assert main(["--n=0"]) == 2
  captured = capsys.readouterr()
  assert captured.err == "error: --n='0': give positive integers separated by commas.\n"
  assert captured.out == ""
  assert main.__name__ == "main"

  @report.one_line_errors
  def broken(argv=None):
    raise RuntimeError("a bug, not the user's")

  with pytest.raises(RuntimeError):  # Only user errors are reworded.
    broken([])


def test_dry_run_line(tmp_path):
  assert report.dry_run_line("2 variant(s) build", None) == "Dry run: 2 variant(s) build."
  out = report.prepare_out(str(tmp_path / "o"))
  assert report.dry_run_line("x", out) == f"Dry run: x; {tmp_path / 'o'} is writable."


# ---------------------------------------------------------------- The committed tables.

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
TEXT_KEYS = {"attention", "memory", "attention_kwargs", "error", "remat_policy"}


def _committed(name: str) -> tuple[list[str], list[dict]]:
  """docs/benchmarks/NAME.md's lines, and NAME.csv's rows as the benchmark held them
  (numbers as numbers, empty cells absent)."""
  with open(DOCS / f"{name}.csv", newline="") as f:
    rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
  for r in rows:
    for k, v in r.items():
      if k not in TEXT_KEYS:
        r[k] = float(v) if any(c in v for c in ".en") else int(v)
  return (DOCS / f"{name}.md").read_text().splitlines(), rows


def test_attention_table_rebuilds_its_committed_markdown_to_the_byte():
  lines, rows = _committed("attention_cpu")
  table = attention.markdown(rows, lines[0])
  table += "\n\nAgainst the targets (sub-quadratic variants):\n\n" + attention.targets(rows)
  assert table.splitlines() == lines


def test_memory_tables_rebuild_their_committed_markdown_to_the_byte():
  lines, rows = _committed("memory_footprint")
  table = report.markdown_table(rows, memory.FOOTPRINT_COLUMNS, lines[0], memory.FOOTPRINT_NOTES)
  assert table.splitlines() == lines
  lines, rows = _committed("memory_speed")
  table = report.markdown_table(rows, memory.SPEED_COLUMNS, lines[0])
  assert table.splitlines() == lines[: 4 + len(rows)]  # The notes are main's.


def test_lm_attention_table_rebuilds_its_committed_markdown_to_the_byte():
  lines, rows = _committed("lm_attention_cpu")
  table = lm_attention.markdown(rows, lines[0]).splitlines()
  assert table == lines[: len(table)] and lines[len(table) + 1].startswith("- Attention kwargs")
