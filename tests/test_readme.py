"""The README is executable: its commands run as a user types them.

- The quick-start block and the byte-LM smoke commands run verbatim, from the
  root of a fresh copy of the repository (the tracked files only), relative
  paths exactly as written.
- Every other `python ...` command in the README's code blocks runs under
  `--dry_run` (the training and benchmark commands) or on small data (the GPU
  check's reduced mode); `...` placeholders become a directory name.
- A README command that no rule here exercises fails the test, so a command
  added to the README comes with the way it is tested.
- `.ci/run` calls exactly the README's setup and test commands.

Marked slow: the commands start real processes.
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from efficient_transformers.data import listops
from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.slow

README = os.path.join(REPO, "README.md")


def _blocks() -> list[list[str]]:
  """The commands of each ```bash block: continuations joined, comments dropped."""
  blocks, lines, inside = [], [], False
  for line in open(README).read().splitlines():
    if line.startswith("```bash"):
      inside, lines = True, []
    elif line.startswith("```") and inside:
      inside = False
      commands, pending = [], ""
      for text in "\n".join(lines).replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{text}" if pending else text
        try:
          words = shlex.split(pending, comments=True)
        except ValueError:  # An open quote: the command goes on on the next line.
          continue
        if words:
          commands.append(shlex.join(words))
        pending = ""
      blocks.append(commands)
    elif inside:
      lines.append(line)
  return blocks


def _python_commands(command: str) -> list[str]:
  """`command` if it runs python, or the python commands inside it (gcloud ... --command=)."""
  if command.startswith("python "):
    return [command]
  found = []
  for word in shlex.split(command):
    for part in word.split("&&"):
      part = " ".join(part.split())
      if part.startswith("python "):
        found.append(part)
  return found


def _quick_start() -> list[str]:
  (block,) = [b for b in _blocks() if b and b[0].startswith("pip install -r requirements.txt")]
  return block


VERBATIM_LM = [
  "python train.py --config=configs/lm/byte_lm.py:smoke --workdir=workdirs/lm_smoke",
  "python eval.py --config=configs/lm/byte_lm.py:smoke --workdir=workdirs/lm_smoke",
]


def _after_quick_start() -> list[str]:
  """The README's commands that read the quick start's workdir: the attention pictures, the
  distilled student and the int8 evaluation."""
  return [
    c
    for c in _commands()
    if c.startswith("python -m efficient_transformers.visualize")
    or (c.startswith("python eval.py") and "--quantize=" in c)
    or "--config.distill.teacher_workdir=workdirs/" in c
  ]


def _how(command: str) -> str:
  """How the README command is exercised here; "" if by no rule."""
  if command in _quick_start() or command in VERBATIM_LM:
    return "verbatim"
  if command in _after_quick_start():
    return "verbatim, after the quick start"
  if "--coordinator_address=" in command:
    return "two processes, --dry_run"
  if command.startswith("python -m efficient_transformers.benchmarks.gpu_check"):
    return "reduced"
  if command.startswith(("python train.py", "python -m efficient_transformers.benchmarks.")):
    return "dry_run"
  return ""


def _commands() -> list[str]:
  return [p for block in _blocks() for c in block for p in _python_commands(c)]


def test_every_readme_command_is_exercised():
  commands = _commands()
  assert len(commands) >= 12, commands
  unexercised = [c for c in commands if not _how(c)]
  assert not unexercised, f"README commands no test runs: {unexercised}"
  assert all(c in commands for c in VERBATIM_LM)


def test_ci_runs_exactly_the_readme_setup_and_test_commands():
  quick = _quick_start()
  setup = [c for c in quick if c.startswith("pip ")]
  tests = [c for c in quick if c == "pytest"]
  assert setup == ["pip install -r requirements.txt"] and tests == ["pytest"]
  ci = [
    line.strip()
    for line in open(os.path.join(REPO, ".ci", "run")).read().splitlines()
    if line.strip() and not line.startswith(("#", "set ", "cd "))
  ]
  assert ci == ["python -m " + setup[0], "pytest"], ci


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
  """The tracked (and new, not ignored) files of the repository, copied: a fresh clone."""
  root = tmp_path_factory.mktemp("fresh") / "efficient_transformers"
  files = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
    cwd=REPO,
    capture_output=True,
    check=True,
  ).stdout.decode()
  for name in filter(None, files.split("\0")):
    source = os.path.join(REPO, name)
    if os.path.isfile(source):
      os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
      shutil.copy2(source, os.path.join(root, name))
  return root


def _shell(command: str, cwd, *, timeout=600, fast_compile=True):
  """`command` through bash, as typed, `python` being this interpreter."""
  env = cli_env(1, fast_compile=fast_compile)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  env.pop("PYTHONPATH", None)  # The copy's own files, not this checkout's.
  return subprocess.run(
    ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def test_quick_start_runs_verbatim_in_a_fresh_copy(fresh_copy):
  for command in _quick_start():
    if command.startswith("pip ") or command == "pytest":
      continue  # CI itself runs these two (see the test above).
    done = _shell(command, fresh_copy, fast_compile=False)  # Hundreds of steps: run fast.
    assert done.returncode == 0, (command, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
  workdir = fresh_copy / "workdirs" / "listops_smoke"
  assert (fresh_copy / "data" / "lra" / "listops_smoke" / "basic_train.tsv").exists()
  assert {"checkpoints", "best", "metrics.jsonl", "tensorboard", "results.json"} <= {
    p.name for p in workdir.iterdir()
  }
  # What the README's Results table claims for this run: well above the majority class.
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  final = [r for r in records if r["split"] == "validation" and r["step"] == 400]
  data_dir = str(fresh_copy / "data" / "lra" / "listops_smoke")
  targets = listops.load_split(data_dir, "val", max_length=64)["targets"]
  majority = np.bincount(targets).max() / len(targets)
  results = json.loads((workdir / "results.json").read_text())
  assert results["checkpoint"] == "best" and results["num_examples"] == len(targets) == 500
  # Measured: 37.6% against a 12.0% majority class (README). Clearly above it:
  assert final and final[0]["accuracy"] >= majority + 0.12, (final, majority)

  # The commands that read that run, as the README types them: the attention pictures, a
  # distilled student, and int8 post-training quantization scored by eval.py.
  after = _after_quick_start()
  assert len(after) >= 4, after
  for command in after:
    done = _shell(command, fresh_copy, fast_compile="distill" not in command)
    assert done.returncode == 0, (command, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if "visualize" in command:
      out = fresh_copy / re.search(r"--out=(\S+)", command).group(1)
      pngs = [p for p in out.iterdir() if p.suffix == ".png"]
      assert pngs and all(p.stat().st_size > 1000 for p in pngs), (command, pngs)
  student = fresh_copy / "workdirs" / "listops_student" / "validation.json"
  student = json.loads(student.read_text())
  assert student["step"] == 400 and student["accuracy"] > majority, student
  int8 = json.loads((workdir / "results_int8.json").read_text())
  assert int8["quantize"] == "int8" and int8["param_bytes"] < 0.4 * int8["float32_param_bytes"]
  # Post-training int8 keeps the test accuracy within a point of the float model's.
  assert abs(int8["test"]["accuracy"] - results["test"]["accuracy"]) <= 0.01, (int8, results)


def test_lm_smoke_commands_run_verbatim(fresh_copy):
  for command in VERBATIM_LM:
    done = _shell(command, fresh_copy, fast_compile=False)
    assert done.returncode == 0, (command, done.stderr[-3000:])
  results = json.loads((fresh_copy / "workdirs" / "lm_smoke" / "results.json").read_text())
  # The README reports 3.60 bits/byte against the corpus's 4.48-bit unigram entropy.
  assert np.isfinite(results["test"]["bits_per_byte"]) and results["test"]["bits_per_byte"] < 4.48


def _dry(command: str) -> str:
  return command.replace("=...", "=readme_placeholder") + " --dry_run"


def _without_workdir(command: str) -> str:
  return " ".join(w for w in command.split() if not w.startswith(("--workdir=", "--dry_run")))


# Commands that differ only in --workdir (which a dry run does not touch) are one dry run.
DRY_RUNS = list(
  {_without_workdir(c): c for c in reversed(_commands()) if _how(c) == "dry_run"}.values()
)


@pytest.mark.spread
@pytest.mark.parametrize("command", DRY_RUNS)
def test_command_runs_under_dry_run(command, fresh_copy):
  done = _shell(_dry(command), fresh_copy)
  if "implementation=cudnn" in command:
    # cuDNN needs an NVIDIA GPU: on CPU the command must say so in one line.
    assert done.returncode == 2, done.stderr[-3000:]
    assert "needs an NVIDIA GPU" in done.stderr and "Traceback" not in done.stderr
    return
  assert done.returncode == 0, (command, done.stderr[-3000:])
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert not (fresh_copy / "readme_placeholder").exists()  # A dry run writes nothing.
  out = re.search(r"--out=(\S+)", command)
  if out:  # A benchmark's dry run checks its output directory, relative to where it runs.
    assert (fresh_copy / out.group(1)).is_dir()


def test_multi_host_command_runs_two_processes_under_dry_run(fresh_copy):
  (command,) = [c for c in _commands() if _how(c) == "two processes, --dry_run"]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  command = re.sub(r"--coordinator_address=\S+", f"--coordinator_address=localhost:{port}", command)
  env = {**cli_env(1), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  logs = [open(fresh_copy / f"host{i}.log", "w+") for i in range(2)]  # noqa: SIM115
  procs = [
    subprocess.Popen(
      ["bash", "-c", _dry(command.replace("--process_id=0", f"--process_id={i}"))],
      cwd=fresh_copy,
      env=env,
      stdout=logs[i],
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  try:
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs, strict=True):
    log.seek(0)
    out = log.read()
    assert p.returncode == 0, out[-3000:]
    assert "over 2 x cpu" in out and "nothing was read" in out


def test_gpu_check_command_runs_reduced(fresh_copy):
  (command,) = [c for c in _commands() if _how(c) == "reduced"]
  done = _shell(command + " --reduced --parts=correctness", fresh_copy)
  assert done.returncode == 0, done.stderr[-3000:]
  out = re.search(r"--out=(\S+)", command).group(1)
  assert (fresh_copy / out / "gpu_check.md").exists()
