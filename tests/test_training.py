"""The training system in-process: end to end, sharded parity, accumulation, NaN stop."""

import json
import os

import jax
import numpy as np
import pytest

from efficient_transformers.data import pipeline, tasks
from efficient_transformers.training import (
  NonFiniteLossError,
  checkpointing,
  eval_lib,
  sharding,
  state,
  train_and_evaluate,
)
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("listops_tiny")


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_and_evaluate_end_to_end(tmp_path, data_dir):
  config = tiny_config(data_dir)
  workdir = str(tmp_path / "run")
  final = train_and_evaluate(config, workdir)
  assert np.isfinite(final["loss"]) and 0.0 <= final["accuracy"] <= 1.0
  assert final["num_examples"] == 20  # Every validation example once.

  records = _records(workdir)
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "validation"]
  assert [r["step"] for r in train] == [2, 4, 6]
  assert [r["step"] for r in val] == [3, 6]
  for key in (
    "loss",
    "accuracy",
    "learning_rate",
    "grad_norm",
    "steps_per_sec",
    "examples_per_sec",
  ):
    assert key in train[-1], key
  assert any(
    f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard"))
  )

  results = eval_lib.evaluate_checkpoint(config, workdir, which="best")
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  assert results["task"] == "listops" and results["attention"] == "softmax"
  assert results["num_examples"] == 20
  assert set(results["test"]) == {"accuracy", "loss"}
  assert results["step"] in (3, 6) and results["device_kind"]
  assert eval_lib.evaluate_checkpoint(config, workdir, which="latest")["step"] == 6
  at_step_4 = eval_lib.evaluate_checkpoint(config, workdir, which=4)
  assert at_step_4["step"] == 4 and at_step_4["num_examples"] == 20


def test_init_from_takes_parameters_only(tmp_path, data_dir):
  source = tiny_config(data_dir)
  train_and_evaluate(source, str(tmp_path / "source"))
  target = tiny_config(data_dir, steps=1)
  target.init_from = str(tmp_path / "source")
  target.optimizer.grad_clip_norm = 1.0  # Another optimizer state: must not matter.
  target.optimizer.learning_rate = 0.0  # So the one step leaves the parameters as loaded.
  target.optimizer.warmup_steps = 1  # A cosine warmup longer than the run is refused.
  target.eval_every_steps = 1
  train_and_evaluate(target, str(tmp_path / "target"))
  setup = state.make_setup(target, tasks.describe(target))
  loaded = {}
  for name in ("source", "target"):
    ckpt = checkpointing.Checkpointer(str(tmp_path / name))
    which = "best" if name == "source" else "latest"
    loaded[name] = jax.device_get(
      ckpt.restore_params(setup.abstract_state["params"], which=which)[1]
    )
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, loaded["target"], loaded["source"])


def _run_steps(config, devices, num_steps):
  task = tasks.load(config)
  setup = state.make_setup(config, tasks.describe(config), devices=devices)
  spec = setup.batch_spec(task.splits["train"], config.batch_size)
  step_fn = setup.compile_train_step(
    spec, seed=config.seed, grad_accum_steps=config.optimizer.grad_accum_steps
  )
  it = pipeline.train_iterator(task.splits["train"], global_batch_size=config.batch_size, seed=0)
  train_state = state.init_state(setup)
  losses = []
  for _ in range(num_steps):
    train_state, metrics = step_fn(
      train_state, sharding.global_batch(next(it), setup.batch_sharding)
    )
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(train_state["params"])


def _assert_params_close(a, b):
  # atol covers the key bias, whose true gradient is zero: Adam normalizes its
  # rounding noise into updates of ~1e-6 whose sign depends on summation order.
  # A real difference moves parameters by ~learning_rate (1e-3 here).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), a, b)


def test_sharded_train_step_matches_single_device(data_dir):
  config = tiny_config(data_dir)
  # Adam with LRA's eps=1e-9 turns float rounding in exactly-zero gradients (the
  # key bias cannot change softmax) into full-size updates of either sign; a
  # larger eps keeps the comparison about sharding, not about rounding order.
  # (At 1e-6 the key bias's rounding noise, ~1e-8 on some CPUs, still moved it
  # by 2.5e-5: 1e-4 leaves it 1e-7, while real updates stay ~1e-4.)
  config.optimizer.eps = 1e-4
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  sharded_losses, sharded_params = _run_steps(config, jax.devices()[:8], 3)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  single_losses, single_params = _run_steps(config, jax.devices()[:1], 3)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  _assert_params_close(sharded_params, single_params)
  assert sharded_losses[0] != sharded_losses[-1]  # The steps did train.


def test_gradient_accumulation_matches_one_big_batch(data_dir):
  config = tiny_config(data_dir)
  config.optimizer.eps = 1e-6  # See test_sharded_train_step_matches_single_device.
  config.model.dropout_rate = 0.0  # Micro-batches draw their own dropout masks.
  config.mesh.data = 1
  full_losses, full_params = _run_steps(config, jax.devices()[:1], 2)
  config.optimizer.grad_accum_steps = 4
  acc_losses, acc_params = _run_steps(config, jax.devices()[:1], 2)
  np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
  _assert_params_close(acc_params, full_params)


def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, data_dir):
  config = tiny_config(data_dir, steps=20)
  config.optimizer.learning_rate = 1e30
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.log_every_steps = 1
  with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
    train_and_evaluate(config, str(tmp_path / "nan"))
