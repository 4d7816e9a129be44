"""Generators killed with SIGKILL: no worker outlives them, a rerun cleans up and matches.

Each test runs a generator's command line with two workers, kills it (kill -9,
so no cleanup code of its own runs) while its workers draw, checks within a
few seconds that none of its child processes is left, then reruns the same
command and compares every file with an uninterrupted run's.

Processes are read from /proc (Linux only), not psutil.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [
  pytest.mark.slow,  # Multi-process: about 5 s each on 2 idle cores.
  pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc"),
]

LISTOPS = [
  sys.executable, "-m", "efficient_transformers.data.listops", "--num_workers=2",
  "--num_train=6000", "--num_val=300", "--num_test=300",
]  # fmt: skip
PATHFINDER = [
  sys.executable, "-m", "efficient_transformers.data.pathfinder_generator", "--num_workers=2",
  "--num_images=1500", "--images_per_batch=50", "--difficulty=hard", "--seed=3",
]  # fmt: skip
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The commands run in tmp_path: the checkout must be importable from there.
ENV = dict(
  os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
)


def stat(pid: int) -> list[str] | None:
  """The fields of /proc/PID/stat after the command name (state first), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()
  except OSError:
    return None


def start_time(pid: int) -> int | None:
  """The start time of a live (not zombie) process `pid`, or None once it has ended."""
  fields = stat(pid)
  return None if fields is None or fields[0] in ("Z", "X") else int(fields[19])


def descendants(pid: int) -> dict[int, int]:
  """{pid: start time} of the live processes below `pid` (found by their parent pids)."""
  parents = {}
  for name in os.listdir("/proc"):
    fields = stat(int(name)) if name.isdigit() else None
    if fields is not None and fields[0] not in ("Z", "X"):
      parents[int(name)] = (int(fields[1]), int(fields[19]))
  found, todo = {}, [pid]
  while todo:
    parent = todo.pop()
    for child, (ppid, started) in parents.items():
      if ppid == parent and child not in found:
        found[child] = started
        todo.append(child)
  return found


def survivors(procs: dict[int, int]) -> list[int]:
  """The processes of `procs` still running (the same process: same pid and start time)."""
  return [pid for pid, started in procs.items() if start_time(pid) == started]


def run(command: list[str], cwd) -> None:
  done = subprocess.run(
    command, cwd=cwd, env=ENV, capture_output=True, text=True, check=False, timeout=60
  )
  assert done.returncode == 0, done.stderr[-3000:]


def kill_while_drawing(command: list[str], cwd, out_dir) -> None:
  """Starts `command`, kills it with SIGKILL once two workers run; asserts none survives."""
  with open(os.path.join(cwd, "killed.log"), "w") as log:
    proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=log, env=ENV)
  children: dict[int, int] = {}
  try:
    deadline = time.monotonic() + 30
    # Until two workers (children running multiprocessing's spawn_main, besides
    # its resource tracker) are drawing: results are being written.
    while len([p for p in children if b"spawn_main" in _cmdline(p)]) < 2 or not writing(out_dir):
      assert proc.poll() is None, "the generator ended before the kill; make it bigger"
      assert time.monotonic() < deadline, "no workers drawing after 30 s"
      time.sleep(0.02)
      children.update(descendants(proc.pid))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while survivors(children) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not survivors(children), f"processes outlived the killed generator: {children}"
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    for pid in survivors(children):  # Only the orphans of the process started here.
      os.kill(pid, signal.SIGKILL)


def writing(out_dir) -> bool:
  """Whether a temporary file under `out_dir` holds more than a header (or a folder, a file)."""
  for dirpath, dirs, files in os.walk(out_dir):
    for name in dirs + files:
      path = os.path.join(dirpath, name)
      with contextlib.suppress(OSError):  # Renamed meanwhile.
        if ".tmp-" in name and (os.listdir(path) if name in dirs else os.path.getsize(path) > 64):
          return True
  return False


def _cmdline(pid: int) -> bytes:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read()
  except OSError:
    return b""


def tree(root) -> dict[str, bytes]:
  """Every file under `root` (hidden ones included) by relative path, with its bytes."""
  out = {}
  for dirpath, dirnames, names in os.walk(root):
    for name in names + [d for d in dirnames if ".tmp-" in d]:
      path = os.path.join(dirpath, name)
      if os.path.isfile(path):
        with open(path, "rb") as f:
          out[os.path.relpath(path, root)] = f.read()
      else:
        out[os.path.relpath(path, root)] = b"<dir>"
  return out


@pytest.mark.parametrize("command,flag", [(LISTOPS, "--data_dir"), (PATHFINDER, "--out_dir")])
def test_killed_generation_leaves_no_workers_and_rerun_matches(command, flag, tmp_path):
  run(command + [f"{flag}=reference"], tmp_path)
  kill_while_drawing(command + [f"{flag}=killed"], tmp_path, tmp_path / "killed")
  run(command + [f"{flag}=killed"], tmp_path)
  reference, rerun = tree(tmp_path / "reference"), tree(tmp_path / "killed")
  assert not [name for name in rerun if ".tmp-" in name]
  assert sorted(rerun) == sorted(reference)
  assert rerun == reference


WATCHED_CHILD = """
import os, sys, threading, time
from efficient_transformers import interruptions
from efficient_transformers.data import listops
threading.Thread(target=interruptions._watch_parent, args=(os.getppid(),), daemon=True).start()
print("watching", flush=True)
time.sleep(60)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_watchdog_fallback_ends_a_worker_whose_parent_died():
  # Where prctl is missing, a thread polling getppid() ends the worker instead.
  parent = subprocess.Popen(
    [sys.executable, "-c", PARENT, WATCHED_CHILD], stdout=subprocess.PIPE, env=ENV, text=True
  )
  watched = {}
  try:
    child = int(parent.stdout.readline())
    assert parent.stdout.readline() == "watching\n"
    watched[child] = start_time(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while survivors(watched) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not survivors(watched)
  finally:
    if parent.poll() is None:
      parent.kill()
      parent.wait()
    for pid in survivors(watched):
      os.kill(pid, signal.SIGKILL)


def test_worker_whose_parent_died_before_its_initializer_exits():
  # The parent died before prctl took effect: getppid() no longer names it.
  code = "from efficient_transformers import interruptions as i; i.end_with_parent(-1); print(1)"
  done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, check=False)
  assert (done.returncode, done.stdout) == (1, b"")
