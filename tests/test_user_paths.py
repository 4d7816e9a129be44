"""train.py and eval.py with paths as users type them, and damaged checkpoints found by both.

Marked slow: each test runs the command lines.
"""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY_FLAGS, cli_env, run_cli

pytestmark = pytest.mark.slow

CONFIG = f"--config={REPO}/configs/lra/listops.py:smoke"


def _run(script, *args, cwd, home):
  env = {**cli_env(1), "HOME": str(home)}
  return subprocess.run(
    [sys.executable, os.path.join(REPO, script), *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_relative_home_trailing_slash_and_symlinked_paths(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  flags = [CONFIG, *TINY_FLAGS, "--config.num_train_steps=4"]
  # Relative workdir with a trailing slash, relative data_dir.
  first = _run(
    "train.py", *flags, "--config.data_dir=data/", "--workdir=runs/a/", cwd=tmp_path, home=home
  )
  assert first.returncode == 0, first.stderr[-3000:]
  assert (tmp_path / "runs" / "a" / "checkpoints").is_dir()
  assert (tmp_path / "data" / "basic_train.tsv").exists()

  # ~ in the workdir and data_dir, init_from through a relative symlink.
  os.symlink(tmp_path / "data", home / "data")
  os.symlink("runs/a", tmp_path / "link")
  second = _run(
    "train.py",
    *flags,
    "--config.data_dir=~/data",
    "--config.init_from=link/",
    "--workdir=~/b/",
    cwd=tmp_path,
    home=home,
  )
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"Initialized parameters from {tmp_path / 'link'}" in second.stderr
  assert (home / "b" / "checkpoints").is_dir() and not (tmp_path / "~").exists()

  evaluated = _run(
    "eval.py", *flags, "--config.data_dir=~/data", "--workdir=~/b", cwd=tmp_path, home=home
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert (home / "b" / "results.json").exists()


def _flip(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_by_train_and_eval(tmp_path):
  workdir = tmp_path / "run"
  flags = ["--config=configs/lra/listops.py:smoke", f"--config.data_dir={tmp_path / 'data'}"]
  flags += TINY_FLAGS
  first = run_cli("train.py", *flags, "--config.num_train_steps=4", f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-3000:]
  arrays = workdir / "checkpoints" / "4" / "state"
  damaged = max((f for f in arrays.rglob("d/*")), key=lambda f: f.stat().st_size)
  _flip(damaged)
  name = damaged.relative_to(workdir / "checkpoints" / "4").as_posix()

  refused = run_cli("eval.py", *flags, "--checkpoint=latest", f"--workdir={workdir}")
  assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
  assert (
    "step 4" in refused.stderr and name in refused.stderr and "--checkpoint=3" in refused.stderr
  )

  resumed = run_cli("train.py", *flags, "--config.num_train_steps=6", f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  warning = [line for line in resumed.stderr.splitlines() if "damaged" in line]
  assert warning and "step 4" in warning[0] and name in warning[0], resumed.stderr[-3000:]
  assert "at step 3." in resumed.stderr  # Resumed from the intact step before it.
