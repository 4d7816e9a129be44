"""What an interrupted run leaves behind, and how the next one tells it apart.

- Temporary files are named `PATH.tmp-HOST-PID` (`temp_path`) and renamed into
  place when complete; `remove_stale_temps` removes those whose writer has
  ended, and never a live process's or another host's (a data directory may
  be on a file system several hosts share, where only the writer's own host
  can tell that the writer has died).
- Worker processes end with their parent (`worker_pool`, `end_with_parent`),
  even when the parent is killed with SIGKILL: the kernel kills them
  (PR_SET_PDEATHSIG on Linux), or a watchdog thread does elsewhere.
"""

import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time

_log = logging.getLogger(__name__)

# Hostname characters only, so that names parse back (see `_TEMP`).
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
# BASE.tmp-HOST-PID; BASE.tmp-PID is the form of earlier versions.
_TEMP = re.compile(r"(?P<base>.+)\.tmp-(?:(?P<host>[A-Za-z0-9._-]+)-)?(?P<pid>\d+)")
_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


def temp_path(path: str) -> str:
  """Where this process writes `path` before renaming it into place: `PATH.tmp-HOST-PID`.

  The host is in the name because a data directory may be on a file system
  that several hosts share, where a pid alone says nothing: only this host can
  tell that one of its processes has died.
  """
  return f"{path}.tmp-{_HOST}-{os.getpid()}"


def _process_ended(pid: int) -> bool:
  """Whether process `pid` of this host has ended (or is a zombie: ended, not yet reaped)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False  # Another user's live process.
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
  except (OSError, IndexError):
    return False  # No /proc (not Linux): a pid that answers is live.


def remove_stale_temps(directory: str, bases: str) -> list[str]:
  """Removes the `temp_path` files and folders in `directory` whose writer has ended.

  Another host's temporary files, and those of a live process of this host,
  are left alone: they may be in the middle of being written. (A dead
  writer's pid reused by a new process keeps its files until that one ends.)
  Names of the earlier `BASE.tmp-PID` form are taken to be this host's.

  Args:
    directory: the folder to clean.
    bases: a regular expression that the name before `.tmp-` must match, so
      that only the caller's own kind of file is touched.

  Returns:
    The names removed.
  """
  removed = []
  for name in os.listdir(directory):
    match = _TEMP.fullmatch(name)
    if not match or not re.fullmatch(bases, match["base"]):
      continue
    if match["host"] not in (None, _HOST) or not _process_ended(int(match["pid"])):
      continue
    path = os.path.join(directory, name)
    with contextlib.suppress(FileNotFoundError):  # Another run may be cleaning too.
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    removed.append(name)
  if removed:
    _log.info("Removed what interrupted runs left in %s: %s", directory, ", ".join(removed))
  return removed


def worker_pool(num_workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """A pool of `num_workers` spawned processes, each ending when this process dies.

  Without this, a parent killed with SIGKILL leaves its workers running:
  each holds both ends of the pool's queues, so none ever reads an end of
  file, and they wait (or draw) forever.
  """
  # spawn, not fork: the parent may hold JAX's threads, which fork breaks.
  context = multiprocessing.get_context("spawn")
  return concurrent.futures.ProcessPoolExecutor(
    num_workers, mp_context=context, initializer=end_with_parent, initargs=(os.getpid(),)
  )


def end_with_parent(parent_pid: int) -> None:
  """Pool initializer: makes this worker end as soon as `parent_pid` does.

  On Linux the kernel does it: PR_SET_PDEATHSIG sends SIGKILL at the
  parent's death, however it dies and whatever this worker is doing, with no
  thread here and no polling delay. (The signal follows the thread that
  started the worker; ProcessPoolExecutor starts spawn workers from the
  thread that submits, which waits on the pool until it shuts down.) The
  parent may have died before the request: then getppid() no longer names
  it. Elsewhere, or if prctl is missing, a daemon thread polls getppid().
  """
  armed = False
  if sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      armed = libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent_pid:
    os._exit(1)
  if not armed:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
  while os.getppid() == parent_pid:  # A dead parent's children are adopted by another.
    time.sleep(0.5)
  os._exit(1)
