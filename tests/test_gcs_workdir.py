"""gs:// workdirs against a real GCS API (a local emulator), through the pod's code path.

train.py, eval.py and the LRA runner write every workdir file through
etils.epath (gcsfs) and Orbax/TensorStore's gcs driver; the emulator serves
both. Marked slow: the command lines start real processes.
"""

import json
import os
import subprocess
import sys

import pytest
from etils import epath

from efficient_transformers.training.workdir import WorkdirBusyError, WorkdirLock
from tests.gcs_emulator import BUCKET, Emulator
from tests.helpers import REPO, TINY_FLAGS, cli_env

pytestmark = pytest.mark.slow

SMOKE = "--config=configs/lra/listops.py:smoke"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  emulator = Emulator(tmp_path_factory.mktemp("gcs") / "emulator.log")
  previous = emulator.apply()
  yield emulator
  emulator.stop()
  for key, value in previous.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


def _run(gcs, script, *args, **kw):
  env = {**cli_env(1), **gcs.env}
  return subprocess.run(
    [sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw
  )


def _steps(workdir: epath.Path, split: str) -> list[int]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r["step"] for r in map(json.loads, lines) if r["split"] == split]


def test_train_eval_resume_and_damage_in_a_bucket(gcs, tmp_path):
  url = f"gs://{BUCKET}/runs/listops/"  # As typed, with a trailing slash.
  workdir = epath.Path(url.rstrip("/"))
  flags = [SMOKE, f"--config.data_dir={tmp_path / 'data'}", *TINY_FLAGS]
  first = _run(gcs, "train.py", *flags, "--config.num_train_steps=4", f"--workdir={url}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "Traceback" not in first.stderr
  names = {p.name for p in workdir.iterdir()}
  assert {"config.json", "metrics.jsonl", "validation.json", "tensorboard"} <= names
  assert {"checkpoints", "best"} <= names and "train.lock" not in names  # Lease released.
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 3, 4]
  assert (workdir / "checkpoints" / "4" / "checksums.json").exists()
  assert _steps(workdir, "train") == [2, 4] and _steps(workdir, "validation") == [3, 4]

  # TensorBoard can read the event file written into the bucket.
  from tensorboard.backend.event_processing import event_accumulator

  (events,) = list((workdir / "tensorboard").iterdir())
  local = tmp_path / "tb" / events.name
  local.parent.mkdir()
  local.write_bytes(events.read_bytes())
  acc = event_accumulator.EventAccumulator(str(local.parent))
  acc.Reload()
  assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]

  evaluated = _run(gcs, "eval.py", *flags, f"--workdir={url}")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["checkpoint"] == "best" and results["num_examples"] == 20

  # The attention pictures, read from and written into the bucket.
  pictures = f"gs://{BUCKET}/pictures/listops"
  drawn = _run(
    gcs, "-m", "efficient_transformers.visualize", *flags, f"--workdir={url}", f"--out={pictures}"
  )
  assert drawn.returncode == 0, drawn.stderr[-3000:]
  drawn_names = {p.name for p in epath.Path(pictures).iterdir()}
  assert {"layer0.png", "rollout.png", "tokens.png", "maps.npz"} <= drawn_names

  # A student distilled from the bucket's run into the bucket, and scored there in int8.
  student = f"gs://{BUCKET}/runs/student"
  distilled = _run(
    gcs,
    "train.py",
    *flags,
    "--config.num_train_steps=2",
    f"--config.distill.teacher_workdir={url}",
    f"--workdir={student}",
  )
  assert distilled.returncode == 0, distilled.stderr[-3000:]
  lines = (epath.Path(student) / "metrics.jsonl").read_text().splitlines()
  assert "kl" in [r for r in map(json.loads, lines) if r["split"] == "train"][-1]
  quantized = _run(gcs, "eval.py", *flags, "--quantize=int8", f"--workdir={student}")
  assert quantized.returncode == 0, quantized.stderr[-3000:]
  int8 = json.loads((epath.Path(student) / "results_int8.json").read_text())
  assert int8["quantize"] == "int8" and int8["num_examples"] == 20

  resumed = _run(gcs, "train.py", *flags, "--config.num_train_steps=6", f"--workdir={url}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {workdir} at step 4" in resumed.stderr
  assert _steps(workdir, "train") == [2, 4, 6]

  # Flipped bytes in the bucket are caught like on a disk.
  arrays = sorted((workdir / "checkpoints" / "6" / "state" / "d").iterdir(), key=str)
  data = bytearray(arrays[0].read_bytes())
  data[len(data) // 2] ^= 0xFF
  arrays[0].write_bytes(bytes(data))
  refused = _run(gcs, "eval.py", *flags, "--checkpoint=6", f"--workdir={url}")
  assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
  assert "step 6" in refused.stderr and f"state/d/{arrays[0].name}" in refused.stderr


def test_lease_lock_in_a_bucket(gcs):
  workdir = epath.Path(f"gs://{BUCKET}/runs/locked")
  first = WorkdirLock(workdir, settle_s=0.2)
  first.acquire()
  assert json.loads((workdir / "train.lock").read_text())["token"]
  with pytest.raises(WorkdirBusyError, match="is in use by another training run"):
    WorkdirLock(workdir, settle_s=0.2).acquire()
  first.release()
  assert not (workdir / "train.lock").exists()


def test_lra_runner_into_a_bucket(gcs, tmp_path):
  tiny = [f.removeprefix("--config.") for f in TINY_FLAGS]
  proc = _run(
    gcs,
    "-m",
    "efficient_transformers.benchmarks.lra",
    "--tasks=listops",
    "--attentions=softmax",
    "--smoke",
    f"--workdir=gs://{BUCKET}/lra",
    "--config_overrides",
    f"data_dir={tmp_path / 'data'}",
    "num_train_steps=3",
    *tiny,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  root = epath.Path(f"gs://{BUCKET}/lra")
  assert {"results.md", "results.csv", "results_cells.csv", "results_plot.png"} <= {
    p.name for p in root.iterdir()
  }
  cell = json.loads((root / "listops" / "softmax" / "cell.json").read_text())
  assert cell["status"] == "finished" and cell["best_step"] == 3
  assert "| softmax |" in (root / "results.md").read_text()
