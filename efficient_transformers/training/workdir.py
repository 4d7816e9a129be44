"""A run's workdir: made usable before anything is computed, and held by one writer.

`prepare(workdir)` resolves what the user typed (see `paths`), refuses a file
or an unwritable directory in one line, and creates the directory.

`WorkdirLock` makes a workdir single-writer: a second `train.py` on a workdir in
use is refused with a message naming the holder, instead of the two runs
deleting each other's unfinished checkpoints. A crashed run cannot leave it
stuck:

- on a local or network file system the lock is an OS lock (`fcntl.flock` on
  `train.lock`), which the kernel releases when its process dies, kill -9
  included; the file also records who holds it, for the message;
- on a bucket (gs://), or a file system without OS locks (some FUSE mounts),
  it is a lease: the holder rewrites `train.lock` every `heartbeat_s` seconds,
  and a lock not renewed for `stale_after_s` seconds (or, on the holder's own
  host, whose process is gone) is stale and taken over with a warning. Two
  runs racing for a free lease both write it, wait `settle_s`, and read it
  back; only the one whose write survived goes on.

In a multi-process run process 0 takes the lock for the whole run and tells
the others whether it got it, so they all go on or all stop with the same
message.
"""

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import numpy as np
from etils import epath

from efficient_transformers import paths
from efficient_transformers.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class WorkdirBusyError(UserError):
  """Another run holds the workdir."""


def prepare(workdir: "str | os.PathLike", *, what: str = "--workdir", create: bool = True):
  """The resolved workdir, created and checked writable; a one-line error otherwise.

  Args:
    workdir: what the user typed (relative, `~`, trailing slash, symlink, gs://).
    what: how to name it in errors.
    create: create the directory (and check it is writable); False only checks
      that it is not a file.

  Raises:
    WorkdirIOError: the path is a file, lies inside a file, or is not writable.
  """
  path = paths.resolve(workdir, what=what)
  if not paths.is_url(path):
    local = os.fspath(path)
    if os.path.exists(local) and not os.path.isdir(local):
      raise paths.WorkdirIOError(
        errno.EEXIST, f"{what}={local} is a file, not a directory: use a directory path."
      )
  if not create:
    return path
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - only the causes a user can fix are reworded.
    error = paths.user_io_error(e, path)
    if error is None:
      raise
    raise error from None
  return path


def _holder_info(extra: dict | None = None) -> dict:
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "command": " ".join(sys.argv),
    "started": time.time(),
    **(extra or {}),
  }


def _describe(info: dict | None) -> str:
  if not info:
    return "another run (it recorded no details)"
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
  return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {when}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by another user.
    return True
  return True


class WorkdirLock:
  """Holds `workdir/train.lock` from `acquire()` to `release()` (also a context manager).

  Args:
    workdir: the resolved workdir (local path or gs:// URL).
    mode: "auto" (an OS lock where the file system has them, else a lease),
      "os" or "lease".
    heartbeat_s, stale_after_s, settle_s: the lease's timing (see the module
      docstring); ignored for OS locks.
  """

  def __init__(
    self,
    workdir,
    *,
    mode: str = "auto",
    heartbeat_s: float = 30.0,
    stale_after_s: float = 180.0,
    settle_s: float = 2.0,
  ):
    if mode not in ("auto", "os", "lease"):
      raise ValueError(f"mode must be auto, os or lease; got {mode!r}")
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._mode = "lease" if paths.is_url(self.workdir) and mode == "auto" else mode
    self._heartbeat_s, self._stale_after_s, self._settle_s = heartbeat_s, stale_after_s, settle_s
    self._fd: int | None = None
    self._token: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.lost: str | None = None  # Why a lease was lost, if it was.

  # ---------------------------------------------------------------- Public.

  def acquire(self, extra: dict | None = None) -> None:
    """Takes the lock or raises WorkdirBusyError naming the holder."""
    if self._mode in ("auto", "os"):
      if self._acquire_os(extra):
        return
      if self._mode == "os":
        raise OSError(errno.ENOLCK, f"{self.path}: this file system has no OS locks")
      log.info("%s: no OS locks on this file system; using a lease instead.", self.path)
      self._mode = "lease"
    self._acquire_lease(extra)

  def release(self) -> None:
    """Gives the lock up (clears the holder record); a no-op if not held."""
    if self._fd is not None:
      try:
        os.ftruncate(self._fd, 0)
      except OSError:
        pass
      os.close(self._fd)  # Closing the descriptor releases the flock.
      self._fd = None
    if self._token is not None:
      self._stop.set()
      if self._thread is not None:
        self._thread.join(timeout=10)
      try:
        if self._read_lease().get("token") == self._token:
          self.path.unlink()
      except Exception as e:  # noqa: BLE001 - a stale lease expires by itself.
        log.warning("Could not remove %s (%s); it expires by itself.", self.path, e)
      self._token = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  # ---------------------------------------------------------------- OS lock.

  def _acquire_os(self, extra: dict | None) -> bool:
    """True if taken, False if this file system has no OS locks; raises if held."""
    import fcntl  # POSIX only; Windows users get the lease.

    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      previous = _read_fd(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirBusyError(self._busy_message(previous)) from None
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
      raise
    previous = _read_fd(fd)
    if previous:
      # The lock was free but names a holder: that run ended without releasing it.
      log.warning(
        "Taking over the lock of %s left by a run that is no longer running (%s).",
        self.workdir,
        _describe(previous),
      )
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder_info(extra)).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return True

  # ---------------------------------------------------------------- Lease.

  def _read_lease(self) -> dict:
    text = paths.read_text(self.path)
    if not text:
      return {}
    try:
      return json.loads(text)
    except ValueError:
      return {}

  def _is_stale(self, info: dict) -> bool:
    if not info:
      return True
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
      return True
    return time.time() - float(info.get("heartbeat", 0)) > self._stale_after_s

  def _acquire_lease(self, extra: dict | None) -> None:
    current = self._read_lease()
    if current and not self._is_stale(current):
      raise WorkdirBusyError(self._busy_message(current))
    if current:
      log.warning(
        "Taking over the stale lock of %s (%s; last renewed %.0f s ago).",
        self.workdir,
        _describe(current),
        time.time() - float(current.get("heartbeat", 0)),
      )
    token = uuid.uuid4().hex
    info = {**_holder_info(extra), "token": token}
    self._write_lease(info)
    time.sleep(self._settle_s)
    winner = self._read_lease()
    if winner.get("token") != token:
      raise WorkdirBusyError(self._busy_message(winner))
    self._token, self._info = token, info
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
    self._thread.start()

  def _write_lease(self, info: dict) -> None:
    paths.write_text(self.path, json.dumps({**info, "heartbeat": time.time()}))

  def _heartbeat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        holder = self._read_lease()
        if holder.get("token") != self._token:
          self.lost = f"the lock of {self.workdir} was taken over by {_describe(holder)}"
          log.error("%s; stop this run: two runs are now writing one workdir.", self.lost)
          return
        self._write_lease(self._info)
      except Exception as e:  # noqa: BLE001 - retried at the next beat.
        log.warning("Could not renew the lock %s: %s", self.path, e)

  def _busy_message(self, holder: dict | None) -> str:
    return (
      f"{self.workdir} is in use by another training run ({_describe(holder)}). Two runs on "
      "one workdir would delete each other's checkpoints: wait for that run to finish or stop "
      "it, or use another --workdir."
    )


def _read_fd(fd: int) -> dict | None:
  try:
    data = os.pread(fd, 1 << 16, 0)
    return json.loads(data) if data.strip() else None
  except (OSError, ValueError):
    return None


def acquire_for_run(workdir, *, process_index: int, process_count: int, **kwargs) -> WorkdirLock:
  """Process 0 takes the lock; every process returns it or raises the same refusal.

  Args:
    workdir: the resolved workdir.
    process_index, process_count: this process and how many share the run.
    **kwargs: WorkdirLock's timing options.
  """
  lock = WorkdirLock(workdir, **kwargs)
  refusal = None
  if process_index == 0:
    try:
      lock.acquire({"process_count": process_count})
    except WorkdirBusyError as e:
      refusal = str(e)
  if process_count > 1:
    from jax.experimental import multihost_utils

    refused = multihost_utils.broadcast_one_to_all(np.asarray(refusal is not None))
    if bool(refused) and refusal is None:
      refusal = (
        f"Process 0 could not take the lock of {lock.workdir}: another training run holds it "
        "(process 0's output names it). Wait for that run to finish, or use another --workdir."
      )
  if refusal is not None:
    raise WorkdirBusyError(refusal)
  return lock
