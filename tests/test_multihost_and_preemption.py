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
from tests.helpers import (
  REPO,
  TINY_FLAGS,
  cli_env,
  run_cli,
  start_train,
  tiny_config,
  wait_for_step,
)

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
  setup = state.make_setup(config, tasks.describe(config))
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


STEPS = 300


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 300-step run: (its flags, its workdir, its data dir)."""
  root = tmp_path_factory.mktemp("reference")
  flags = [
    CONFIG,
    f"--config.data_dir={root / 'data'}",
    *TINY_FLAGS,
    f"--config.num_train_steps={STEPS}",
    "--config.eval_every_steps=100",
    "--config.checkpoint_every_steps=1000",  # Only a preemption save lands mid-run.
  ]
  ref = run_cli("train.py", *flags, f"--workdir={root / 'ref'}", fast_compile=False)
  assert ref.returncode == 0, ref.stderr[-3000:]
  return flags, root / "ref", root / "data"


def test_sigterm_then_rerun_matches_uninterrupted(tmp_path, reference):
  flags, ref_dir, data = reference
  steps = STEPS
  cut_dir = tmp_path / "cut"
  proc = subprocess.Popen(
    [sys.executable, os.path.join(REPO, "train.py"), *flags, f"--workdir={cut_dir}"],
    cwd=REPO,
    env=cli_env(1, fast_compile=False),
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

  rerun = run_cli("train.py", *flags, f"--workdir={cut_dir}", fast_compile=False)
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


def _scalars(workdir, tag):
  """(step, value) of a TensorBoard tag as TensorBoard itself loads the event files."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), purge_orphaned_data=True)
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_kill_9_then_rerun_logs_each_step_once(tmp_path, reference):
  """Steps logged after the last checkpoint are trained again: each must appear once."""
  flags, ref_dir, data = reference
  cut_dir = tmp_path / "cut"
  every = ["--config.checkpoint_every_steps=40"]  # Changes no batch and no parameter.
  proc = start_train([*flags, *every], cut_dir)
  wait_for_step(cut_dir / "metrics.jsonl", 54, proc)  # Logged past the checkpoint at step 40.
  proc.kill()
  proc.communicate(timeout=60)
  logged = [r["step"] for r in map(json.loads, (cut_dir / "metrics.jsonl").open())]
  assert max(logged) > 40

  rerun = run_cli("train.py", *flags, *every, f"--workdir={cut_dir}", fast_compile=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  with open(cut_dir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys)), "a step logged twice"
  ref_train, cut_train = _records(ref_dir, "train"), _records(cut_dir, "train")
  assert sorted(cut_train) == sorted(ref_train)
  for s in ref_train:
    assert cut_train[s]["loss"] == ref_train[s]["loss"], s
  tb_ref, tb_cut = _scalars(ref_dir, "train/loss"), _scalars(cut_dir, "train/loss")
  assert [s for s, _ in tb_cut] == [s for s, _ in tb_ref]  # Each step once, in order.
  np.testing.assert_allclose([v for _, v in tb_cut], [v for _, v in tb_ref], rtol=1e-6)


def test_second_trainer_is_refused_and_the_first_unharmed(tmp_path, reference):
  flags, ref_dir, data = reference
  workdir = tmp_path / "run"
  first = start_train(flags, workdir)
  lock, deadline = workdir / "train.lock", time.time() + 120
  while not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
    assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
    time.sleep(0.05)
  second = run_cli("train.py", *flags, f"--workdir={workdir}")
  assert first.poll() is None, "the first run ended before the second tried: inconclusive"
  assert second.returncode == 2, second.stderr[-3000:]
  assert "Traceback" not in second.stderr
  assert f"{workdir} is in use by another training run" in second.stderr
  assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  config = tiny_config(data, steps=STEPS)
  (ref_step, ref_params), (step, params) = (
    _final_params(str(d), config) for d in (ref_dir, workdir)
  )
  assert ref_step == step == STEPS
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  assert _records(workdir, "validation") == _records(ref_dir, "validation")


def test_a_killed_process_ends_the_other_in_one_line_and_a_rerun_resumes(tmp_path):
  flags = [
    CONFIG,
    f"--config.data_dir={tmp_path / 'data'}",
    *TINY_FLAGS,
    "--config.num_train_steps=120",
    "--config.eval_every_steps=60",
    "--config.checkpoint_every_steps=20",
    "--heartbeat_timeout_seconds=10",
  ]
  workdir = tmp_path / "two"

  def start(port, logs):
    return [
      subprocess.Popen(
        [
          sys.executable,
          os.path.join(REPO, "train.py"),
          *flags,
          f"--workdir={workdir}",
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2",
          f"--process_id={i}",
        ],
        cwd=REPO,
        env=cli_env(2, fast_compile=False),
        stdout=subprocess.DEVNULL,
        stderr=logs[i],
      )
      for i in range(2)
    ]

  logs = [open(tmp_path / f"process_{i}.err", "w+") for i in range(2)]  # noqa: SIM115
  procs = start(_free_port(), logs)
  try:
    wait_for_step(workdir / "metrics.jsonl", 30, procs[0])
    procs[1].kill()  # Its supervisor: the trainer under it must go too.
    procs[0].wait(timeout=200)
  finally:
    for p in procs:
      p.kill()
  logs[0].seek(0)
  err = logs[0].read()
  assert procs[0].returncode == 1, err[-3000:]
  for noise in ("Traceback", "Check failure", "Fatal Python error", "coordination_service"):
    assert noise not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "process 1 of 2 stopped" in errors[0], err[-3000:]
  assert "rerun on every host: python" in errors[0] and "--process_id=0" in errors[0]
  assert list((workdir / "logs").glob("process_0-*.log"))

  logs = [open(tmp_path / f"rerun_{i}.err", "w+") for i in range(2)]  # noqa: SIM115
  procs = start(_free_port(), logs)
  try:
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs, strict=True):
    log.seek(0)
    assert p.returncode == 0, log.read()[-3000:]
  assert "Resumed from" in open(tmp_path / "rerun_0.err").read()
  assert max(_records(workdir, "validation")) == 120
