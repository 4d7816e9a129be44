"""One line, not a thread dump, when another process of a multi-process run dies.

When a process of a multi-host run dies, JAX's coordination service notices
its missing heartbeats and *aborts* every survivor from C++ (LOG(FATAL)),
printing a C++ stack trace and Python's dump of every thread: about a hundred
lines around the one that matters, and no Python code runs to say more.

So in a multi-process run `train.py` runs itself as a child process and
watches the child's stderr: everything passes through as it comes (progress
bars included) until the coordination service's fatal error appears; from
there the output goes only to a log file, and when the child has ended this
process prints one line naming the dead process, the log and the command that
resumes the run. A single-process run is not supervised.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile

_CHILD_ENV = "EFFICIENT_TRANSFORMERS_SUPERVISED"

# Variables set by launchers whose clusters jax.distributed detects on its own.
AUTO_ENV = (
  "SLURM_JOB_ID",
  "OMPI_COMM_WORLD_SIZE",
  "TPU_WORKER_HOSTNAMES",
  "MEGASCALE_COORDINATOR_ADDRESS",
)

# Where the coordination service's fatal error starts (on the coordinator, or a worker).
_FATAL_MARKERS = (
  b"Use error polling to propagate",
  b"Polled an error from coordination service",
  b"Terminating process because the JAX distributed service detected fatal errors",
  b"*** Check failure stack trace: ***",
  b"Fatal Python error:",
  b"Lost contact with another process of this run:",  # `peer_failure`, from the child.
)
# How a collective with a dead peer fails in Python (gloo on CPU; the coordinator's barriers).
_PEER_FAILURES = (
  "Gloo",
  "Connection reset by peer",
  "Connection closed by peer",
  "Barrier timed out",
  "coordination service",
)


def peer_failure(error: BaseException) -> bool:
  """In a multi-process child: reports `error` to the supervisor if another process's
  death caused it (returns True; the caller then exits), else returns False."""
  if not os.environ.get(_CHILD_ENV) or not any(s in str(error) for s in _PEER_FAILURES):
    return False
  sys.stderr.write(f"Lost contact with another process of this run: {type(error).__name__}\n")
  sys.stderr.write(f"{error}\n")
  sys.stderr.flush()
  return True


_UNHEALTHY = re.compile(rb"unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)")
_TASK = re.compile(rb"/task:(\d+)")


def _is_multi_process(argv: list[str]) -> bool:
  given = any(a.split("=", 1)[0] in ("--coordinator_address", "--num_processes") for a in argv)
  return given or any(v in os.environ for v in AUTO_ENV)


def _flag(argv: list[str], name: str) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _log_path(argv: list[str]) -> str:
  """WORKDIR/logs/process_<id>.log for a local workdir, else a file in the temp dir."""
  process = _flag(argv, "process_id") or os.environ.get("SLURM_PROCID") or "x"
  name = f"process_{process}-{os.getpid()}.log"
  workdir = _flag(argv, "workdir")
  if workdir and "://" not in workdir:
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "logs")
    try:
      os.makedirs(directory, exist_ok=True)
      return os.path.join(directory, name)
    except OSError:
      pass
  return os.path.join(tempfile.gettempdir(), f"efficient_transformers-{name}")


def _dead_processes(text: bytes) -> list[int]:
  found = _UNHEALTHY.search(text)
  if found:
    return sorted({int(t) for t in re.findall(rb"\d+", found.group(1))})
  return sorted({int(t) for t in _TASK.findall(text)})


def maybe_supervise(argv: list[str]) -> int | None:
  """Runs this command as a supervised child if it is one process of several.

  Returns the exit code to end with, or None when this process should run the
  command itself (single-process runs, and the child).
  """
  parent = os.environ.get(_CHILD_ENV)
  if parent:
    # The child: if the supervisor is killed (kill -9 included), so is this process,
    # so that the other processes see it gone instead of an orphan training on.
    from efficient_transformers import interruptions

    interruptions.end_with_parent(int(parent))
    return None
  if not _is_multi_process(argv[1:]):
    return None
  env = {**os.environ, _CHILD_ENV: str(os.getpid())}
  child = subprocess.Popen([sys.executable, *argv], env=env, stderr=subprocess.PIPE)

  def forward(signum, frame):
    del frame
    if child.poll() is None:
      child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
  try:
    return _watch(child, argv)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _watch(child: subprocess.Popen, argv: list[str]) -> int:
  """Passes the child's stderr on until a fatal coordination error; returns the exit code."""

  out = sys.stderr.buffer
  tail, fatal, held = b"", False, []
  last = b"\n"  # The last byte passed on: a progress bar leaves its line open.
  fd = child.stderr.fileno()
  while chunk := os.read(fd, 1 << 16):
    if not fatal:
      window = tail + chunk
      cut = min((window.find(m) for m in _FATAL_MARKERS if m in window), default=-1)
      if cut < 0:
        out.write(chunk)
        out.flush()
        last = chunk[-1:]
        tail = window[-4096:]
        continue
      # Pass on what came before the marker's line; hold the rest back.
      line_start = window.rfind(b"\n", 0, cut) + 1
      before = max(line_start - len(tail), 0)
      out.write(chunk[:before])
      out.flush()
      last = chunk[:before][-1:] or last
      held.append(tail[-4096:] + chunk[:before] if before else window[:line_start][-4096:])
      held.append(chunk[before:])
      fatal = True
    else:
      held.append(chunk)
  returncode = child.wait()
  if last != b"\n":
    out.write(b"\n")  # The error line below must start a line of its own.
    out.flush()
  if not fatal:
    if returncode < 0:
      print(
        f"error: the training process was killed by signal {-returncode}; rerun the same "
        "command to resume from its last checkpoint.",
        file=sys.stderr,
      )
      return 128 - returncode
    return returncode
  text = b"".join(held)
  log = _log_path(argv[1:])
  with open(log, "wb") as f:
    f.write(text)
  dead = _dead_processes(text)
  count = _flag(argv[1:], "num_processes")
  who = (
    f"process {', '.join(map(str, dead))}" + (f" of {count}" if count else "")
    if dead
    else "another process of this run"
  )
  command = shlex.join(["python", *argv])
  print(
    f"error: {who} stopped (no heartbeat reached the coordinator), so this process stopped "
    f"too; its last output is in {log}. To resume from the last checkpoint, rerun on every "
    f"host: {command}",
    file=sys.stderr,
  )
  return 1
