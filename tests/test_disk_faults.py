"""A full disk and a read-only workdir: one line naming the path, nothing lost, a rerun resumes.

The workdir is a small tmpfs mounted for the test (root only); where mounting
is not allowed the tests skip, saying why.
"""

import json
import subprocess

import pytest

from efficient_transformers.training.checkpointing import CHECKSUMS, verify
from tests.helpers import TINY_FLAGS, run_cli

pytestmark = pytest.mark.slow

SMOKE = "--config=configs/lra/listops.py:smoke"


@pytest.fixture
def tmpfs(tmp_path):
  """(mount point, remount(options)) of a 3 MiB tmpfs."""
  mount = tmp_path / "mnt"
  mount.mkdir()
  done = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True
  )
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")

  def remount(options: str):
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)

  yield mount, remount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def _assert_one_line(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def _sealed_steps(workdir):
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  return [s for s in steps if (workdir / "checkpoints" / str(s) / CHECKSUMS).exists()]


def test_full_disk_ends_in_one_line_keeps_checkpoints_and_a_rerun_resumes(tmpfs, tmp_path):
  mount, remount = tmpfs
  workdir = mount / "run"
  flags = [
    SMOKE,
    f"--config.data_dir={tmp_path / 'data'}",
    *TINY_FLAGS,
    "--config.num_train_steps=400",
    "--config.checkpoint_every_steps=1",  # Fills the 3 MiB within a few dozen steps.
    "--config.max_checkpoints_to_keep=1000",
    "--config.eval_every_steps=1000",
  ]
  full = run_cli("train.py", *flags, f"--workdir={workdir}")
  line = _assert_one_line(full, str(workdir), "no space left", "free some space")
  kept = _sealed_steps(workdir)
  assert len(kept) >= 2, kept
  assert f"resume from step {kept[-1]}" in line
  for step in kept:  # Every checkpoint written before the disk filled is intact.
    assert verify(workdir / "checkpoints" / str(step)) is None, step

  remount("size=64m")  # Space freed.
  rerun = run_cli("train.py", *flags, "--config.checkpoint_every_steps=100", f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"at step {kept[-1]}" in rerun.stderr  # "Resumed from ... at step N."
  assert json.loads((workdir / "validation.json").read_text())["step"] == 400


def test_read_only_workdir_is_refused_at_once_and_eval_can_write_elsewhere(tmpfs, tmp_path):
  mount, remount = tmpfs
  workdir = mount / "run"
  flags = [SMOKE, f"--config.data_dir={tmp_path / 'data'}", *TINY_FLAGS]
  first = run_cli("train.py", *flags, "--config.num_train_steps=4", f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-3000:]
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  remount("ro")

  again = run_cli("train.py", *flags, "--config.num_train_steps=6", f"--workdir={workdir}")
  _assert_one_line(again, str(workdir), "read-only file system", "use a writable directory")
  evaluated = run_cli("eval.py", *flags, f"--workdir={workdir}")
  _assert_one_line(evaluated, "read-only file system", "--results=PATH")
  assert "accuracy" not in evaluated.stdout  # Refused before evaluating, not after.
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before

  elsewhere = tmp_path / "results" / "test.json"
  evaluated = run_cli("eval.py", *flags, f"--workdir={workdir}", f"--results={elsewhere}")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  (best,) = [int(p.name) for p in (workdir / "best").iterdir() if p.name.isdigit()]
  assert json.loads(elsewhere.read_text())["step"] == best
