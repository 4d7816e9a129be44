"""Paths as users write them, workdir checks, and the one-writer workdir lock."""

import json
import logging
import os
import socket
import time

import pytest

from efficient_transformers import paths
from efficient_transformers.errors import ConfigError
from efficient_transformers.training import workdir as workdir_lib
from efficient_transformers.training.workdir import LOCK_FILE, WorkdirBusyError, WorkdirLock

LOGGER = "efficient_transformers.training.workdir"


def test_resolve_relative_home_trailing_slash_and_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert str(paths.resolve("runs/a/", what="--workdir")) == str(tmp_path / "runs" / "a")
  assert str(paths.resolve("./runs/../b", what="--workdir")) == str(tmp_path / "b")
  assert str(paths.resolve("~/w", what="--workdir")) == str(tmp_path / "home" / "w")
  assert str(paths.resolve("gs://bucket/dir/", what="--workdir")) == "gs://bucket/dir"
  with pytest.raises(ConfigError, match=r"--workdir='s3://b/x': s3:// is not supported"):
    paths.resolve("s3://b/x", what="--workdir")
  with pytest.raises(ConfigError, match="names no bucket"):
    paths.resolve("gs://", what="--workdir")
  with pytest.raises(ConfigError, match="--workdir is empty"):
    paths.resolve("", what="--workdir")
  with pytest.raises(ConfigError, match="config.data_dir='gs://b/d'.*gcsfuse"):
    paths.resolve_local("gs://b/d", what="config.data_dir")


def test_prepare_creates_through_a_symlink_and_refuses_a_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "real").mkdir()
  os.symlink(tmp_path / "real", tmp_path / "link")
  made = workdir_lib.prepare("link/run/")
  assert (tmp_path / "real" / "run").is_dir() and str(made) == str(tmp_path / "link" / "run")
  assert list((tmp_path / "real" / "run").iterdir()) == []  # The write probe is gone.

  (tmp_path / "afile").write_text("keep me")
  with pytest.raises(paths.WorkdirIOError, match=r"--workdir=.*afile is a file, not a directory"):
    workdir_lib.prepare("afile")
  with pytest.raises(paths.WorkdirIOError, match="inside a file, not a directory"):
    workdir_lib.prepare("afile/run")
  assert (tmp_path / "afile").read_text() == "keep me"


def test_user_io_error_finds_the_cause_in_a_chain(tmp_path):
  try:
    try:
      raise OSError(28, "No space left on device")
    except OSError as inner:
      raise ValueError("RESOURCE_EXHAUSTED: write failed") from inner
  except ValueError as e:
    error = paths.user_io_error(e, tmp_path, then="rerun to resume from step 4")
  expected = "has no space left on its device: free some space, then rerun to resume from step 4."
  assert str(error) == f"{tmp_path} {expected}"
  assert paths.user_io_error(ValueError("Read-only file system (30)"), "d").errno == 30
  assert paths.user_io_error(KeyError("x"), "d") is None


@pytest.mark.parametrize("mode", ["os", "lease"])
def test_second_holder_is_refused_naming_the_first(tmp_path, mode):
  first = WorkdirLock(tmp_path, mode=mode, settle_s=0.01)
  first.acquire()
  with pytest.raises(WorkdirBusyError) as refused:
    WorkdirLock(tmp_path, mode=mode, settle_s=0.01).acquire()
  message = str(refused.value)
  assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
  assert str(tmp_path) in message and "another --workdir" in message
  first.release()
  again = WorkdirLock(tmp_path, mode=mode, settle_s=0.01)
  again.acquire()  # Free once released.
  again.release()


def _dead_pid() -> int:
  pid = os.fork()
  if pid == 0:
    os._exit(0)
  os.waitpid(pid, 0)
  return pid


def test_os_lock_left_by_a_dead_run_is_taken_over_with_a_warning(tmp_path, caplog):
  record = {"host": "elsewhere", "pid": _dead_pid(), "started": time.time()}
  (tmp_path / LOCK_FILE).write_text(json.dumps(record))  # What a kill -9 leaves behind.
  lock = WorkdirLock(tmp_path, mode="os")
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    lock.acquire()
  assert any(
    "no longer running" in r.getMessage() and "elsewhere" in r.getMessage() for r in caplog.records
  )
  assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()


def test_lease_goes_stale_by_time_or_dead_pid_and_detects_a_takeover(tmp_path, caplog):
  # A live holder on another host, renewed recently: refused.
  fresh = {"host": "other-host", "pid": 1, "started": 0, "heartbeat": time.time(), "token": "t"}
  (tmp_path / LOCK_FILE).write_text(json.dumps(fresh))
  with pytest.raises(WorkdirBusyError, match="other-host"):
    WorkdirLock(tmp_path, mode="lease", settle_s=0.01, stale_after_s=60).acquire()
  # Not renewed for longer than stale_after_s: taken over, with a warning.
  (tmp_path / LOCK_FILE).write_text(json.dumps({**fresh, "heartbeat": time.time() - 120}))
  lock = WorkdirLock(tmp_path, mode="lease", settle_s=0.01, stale_after_s=60, heartbeat_s=0.05)
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    lock.acquire()
  assert any("stale lock" in r.getMessage() for r in caplog.records)
  time.sleep(0.2)
  renewed = json.loads((tmp_path / LOCK_FILE).read_text())
  assert renewed["pid"] == os.getpid() and time.time() - renewed["heartbeat"] < 1
  # Someone else takes it (we stalled past stale_after_s): the holder notices.
  (tmp_path / LOCK_FILE).write_text(json.dumps({**fresh, "heartbeat": time.time()}))
  time.sleep(0.3)
  assert lock.lost and "other-host" in lock.lost
  lock.release()
  assert (tmp_path / LOCK_FILE).exists()  # Not ours any more: left for its holder.

  # On this host, a holder whose process is gone is stale at once.
  gone = {"host": socket.gethostname(), "pid": _dead_pid(), "heartbeat": time.time(), "token": "x"}
  (tmp_path / LOCK_FILE).write_text(json.dumps(gone))
  lock = WorkdirLock(tmp_path, mode="lease", settle_s=0.01)
  lock.acquire()
  lock.release()
  assert not (tmp_path / LOCK_FILE).exists()
