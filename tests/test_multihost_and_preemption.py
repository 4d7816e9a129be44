"""End to end through train.py: two processes vs one, and SIGTERM then resume.

These start real processes (JAX's CPU backend with gloo collectives), so they
are marked slow; they still run in CI.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from efficient_transformers.data import tasks
from efficient_transformers.training import checkpointing, state
from efficient_transformers.training.evaluation import model_fingerprint
from tests.helpers import REPO, TINY_FLAGS, cli_env, run_cli, tiny_config

pytestmark = pytest.mark.slow

CONFIG = "--config=configs/lra/listops.py:smoke"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def _final_params(workdir, config):
  task = tasks.load(config, generate=False)
  setup = state.make_setup(config, vocab_size=task.vocab_size, num_classes=task.num_classes)
  ckpt = checkpointing.Checkpointer(workdir, fingerprint=model_fingerprint(config, task))
  step, params = ckpt.restore_params(setup.abstract_state["params"], which="latest")
  ckpt.close()
  return step, jax.device_get(params)


def test_two_processes_match_one_process(tmp_path):
  data = tmp_path / "data"
  # Every mesh axis spans both processes' devices, so FSDP and tensor-parallel
  # collectives cross the process boundary. eps: see tests/test_training.py.
  mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
  flags = [
    CONFIG,
    f"--config.data_dir={data}",
    *TINY_FLAGS,
    *mesh,
    "--config.optimizer.eps=1e-6",
    "--config.num_train_steps=6",
  ]
  single = run_cli("train.py", *flags, f"--workdir={tmp_path / 'one'}", num_devices=8)
  assert single.returncode == 0, single.stderr[-3000:]

  port = _free_port()
  # Output to files, not pipes: a pipe nobody drains fills up and blocks its
  # writer, and the two processes would then wait on each other forever.
  logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]  # noqa: SIM115
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(REPO, "train.py"),
        *flags,
        f"--workdir={tmp_path / 'two'}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=cli_env(4),
      stdout=logs[i],
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  try:
    for p in procs:
      p.wait(timeout=400)
  finally:
    for p in procs:
      p.kill()
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert "Joined process 1 of 2" in outs[1]

  for split in ("train", "validation"):
    one, two = _records(tmp_path / "one", split), _records(tmp_path / "two", split)
    assert sorted(one) == sorted(two) and one
    for step in one:
      np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-5)
      np.testing.assert_allclose(two[step]["accuracy"], one[step]["accuracy"], rtol=1e-6)

  config = tiny_config(data, steps=6)
  config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 2
  step_one, params_one = _final_params(str(tmp_path / "one"), config)
  step_two, params_two = _final_params(str(tmp_path / "two"), config)
  assert step_one == step_two == 6
  # atol: the key bias's zero gradient, as in tests/test_training.py.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), params_two, params_one
  )


def test_sigterm_then_rerun_matches_uninterrupted(tmp_path):
  data = tmp_path / "data"
  steps = 300
  flags = [
    CONFIG,
    f"--config.data_dir={data}",
    *TINY_FLAGS,
    f"--config.num_train_steps={steps}",
    "--config.eval_every_steps=100",
    "--config.checkpoint_every_steps=1000",  # Only the preemption save lands mid-run.
  ]
  ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
  ref = run_cli("train.py", *flags, f"--workdir={ref_dir}")
  assert ref.returncode == 0, ref.stderr[-3000:]

  proc = subprocess.Popen(
    [sys.executable, os.path.join(REPO, "train.py"), *flags, f"--workdir={cut_dir}"],
    cwd=REPO,
    env=cli_env(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = cut_dir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:
    if metrics.exists() and any(json.loads(line)["step"] >= 20 for line in metrics.open()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]

  config = tiny_config(data, steps=steps)
  ckpt = checkpointing.Checkpointer(str(cut_dir))
  stopped = ckpt.latest_step()
  ckpt.close()
  assert stopped is not None and 20 <= stopped < steps, stopped

  rerun = run_cli("train.py", *flags, f"--workdir={cut_dir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]

  ref_step, ref_params = _final_params(str(ref_dir), config)
  cut_step, cut_params = _final_params(str(cut_dir), config)
  assert ref_step == cut_step == steps
  jax.tree.map(np.testing.assert_array_equal, cut_params, ref_params)
  ref_train, cut_train = _records(ref_dir, "train"), _records(cut_dir, "train")
  after = [s for s in ref_train if s > stopped + 2]
  assert after
  for s in after:
    assert cut_train[s]["loss"] == ref_train[s]["loss"]
  assert _records(cut_dir, "validation")[steps] == _records(ref_dir, "validation")[steps]
