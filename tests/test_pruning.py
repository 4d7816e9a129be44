"""Magnitude pruning (training/pruning.py): Zhu & Gupta's schedule by hand, the target
sparsity reached on schedule, the smallest weights pruned, and pruned weights kept at zero."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficient_transformers.errors import ConfigError
from efficient_transformers.training import pruning


def test_cubic_schedule_by_hand():
  s = pruning.cubic_sparsity(final_sparsity=0.8, begin_step=10, end_step=50, frequency=10)
  # s_t = 0.8 + (0 - 0.8) (1 - (t - 10) / 40)^3, held between pruning steps 10, 20, .., 50.
  expected = {0: 0.0, 9: 0.0, 10: 0.0, 15: 0.0, 20: 0.8 - 0.8 * 0.75**3, 30: 0.8 - 0.8 * 0.5**3,
              39: 0.8 - 0.8 * 0.5**3, 40: 0.8 - 0.8 * 0.25**3, 50: 0.8, 1000: 0.8}  # fmt: skip
  for step, value in expected.items():
    assert float(s(step)) == pytest.approx(value, abs=1e-6), step


def _params(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return {
    "dense": {"kernel": jax.random.normal(keys[0], (8, 6)), "bias": jnp.ones((6,))},
    "out": {"kernel": 3.0 * jax.random.normal(keys[1], (6, 4))},
  }


def _train(tx, params, steps, seed=1):
  """SGD-like updates with random gradients that push every weight away from zero."""
  state = tx.init(params)
  history = []
  for t in range(steps):
    key = jax.random.fold_in(jax.random.key(seed), t)
    grads = jax.tree.map(lambda p, key=key: jax.random.normal(key, p.shape), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def _count(sparsity: float, n: int) -> int:
  """floor(sparsity * n), the schedule's float32 rounding aside (0.7222 * 72 is 52)."""
  return int(np.floor(sparsity * n + 1e-4))


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_target_sparsity_on_schedule_and_pruned_weights_stay_zero(scope):
  schedule = pruning.cubic_sparsity(final_sparsity=0.75, begin_step=2, end_step=8, frequency=2)
  tx = optax.chain(optax.sgd(0.1), pruning.magnitude_pruning(schedule, scope=scope))
  history = _train(tx, _params(), steps=14)
  kernels = lambda p: [p["dense"]["kernel"], p["out"]["kernel"]]
  for step, params in enumerate(history):
    target = float(schedule(step))
    if scope == "global":
      zeros = sum(int((k == 0).sum()) for k in kernels(params))
      assert zeros == _count(target, 72), (step, zeros, target)
    else:
      for k in kernels(params):
        assert int((k == 0).sum()) == _count(target, k.size), (step, target)
    np.testing.assert_array_equal(params["dense"]["bias"] != 0, True)  # Not prunable.
  # After the last pruning step (8) the mask holds: the same zeros at every later step.
  final_zeros = [np.asarray(k == 0) for k in kernels(history[8])]
  for params in history[9:]:
    for k, zero in zip(kernels(params), final_zeros, strict=True):
      np.testing.assert_array_equal(np.asarray(k == 0), zero)
  stats = pruning.sparsity_stats(history[-1])
  assert stats["sparsity"] == pytest.approx(54 / 72 if scope == "global" else (36 + 18) / 72)
  assert stats["remaining_params"] == 72 - 54 + 6 and stats["num_params"] == 78


def test_the_smallest_magnitudes_are_the_ones_pruned():
  """Against numpy: with zero updates, one pruning step removes the 50% smallest |w|."""
  params = _params()
  tx = pruning.magnitude_pruning(
    pruning.cubic_sparsity(final_sparsity=0.5, begin_step=0, end_step=1), scope="global"
  )
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(zero, state, params)  # step 0: sparsity 0
  updates, _ = tx.update(zero, state, params)  # step 1: sparsity 0.5
  pruned = optax.apply_updates(params, updates)
  flat = np.concatenate([np.abs(np.asarray(params[n]["kernel"])).ravel() for n in ("dense", "out")])
  threshold = np.sort(flat)[36]  # 36 of 72 pruned: keep the 36 largest.
  for name in ("dense", "out"):
    original = np.asarray(params[name]["kernel"])
    np.testing.assert_array_equal(
      np.asarray(pruned[name]["kernel"]), np.where(np.abs(original) >= threshold, original, 0.0)
    )


def test_works_under_jit_and_needs_params():
  tx = pruning.magnitude_pruning(
    pruning.cubic_sparsity(final_sparsity=0.5, begin_step=0, end_step=1)
  )
  params = _params()
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  assert int(state.count) == 1
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(final_sparsity=1.0, begin_step=0, end_step=10), "final_sparsity < 1"),
    (dict(final_sparsity=0.5, begin_step=10, end_step=10), "begin_step < end_step"),
    (dict(final_sparsity=0.5, begin_step=0, end_step=10, frequency=3), "multiple of"),
  ],
)
def test_bad_settings_are_named(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    pruning.cubic_sparsity(**kwargs)
  with pytest.raises(ConfigError, match="scope='rows'"):
    pruning.magnitude_pruning(lambda s: 0.0, scope="rows")


def test_training_prunes_on_schedule_and_logs_sparsity(tmp_path):
  """config.pruning through train.py's loop: the logged sparsity follows the schedule, the
  saved weights end at the target, and a bad sparsity changes nothing in the workdir."""
  import json
  import os

  from efficient_transformers.training import eval_lib, optimizers
  from efficient_transformers.training.train_lib import train_and_evaluate
  from tests.helpers import tiny_config

  c = tiny_config(tmp_path / "data", steps=12)
  c.pruning.final_sparsity, c.pruning.frequency = 0.8, 2
  c.log_every_steps = 1
  workdir = str(tmp_path / "run")
  train_and_evaluate(c, workdir)
  model, _, _ = eval_lib.restore_model(c, workdir, which="latest")
  from flax import nnx

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = pruning.sparsity_stats(params)
  n = sum(p.size for p in jax.tree.leaves(params) if p.ndim >= 2)
  assert abs(stats["sparsity"] - 0.8) <= 1 / n  # end_step -1: 3/4 of 12 steps, so step 8.
  schedule = optimizers.pruning_schedule(c.pruning, c.num_train_steps)
  assert (schedule.begin_step, schedule.end_step) == (0, 8)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 13))
  for r in train:  # After step s the mask is the one computed at optimizer count s - 1.
    expected = np.floor(float(schedule(r["step"] - 1)) * n) / n
    assert abs(r["sparsity"] - expected) <= 1 / n, r
  assert train[-1]["remaining_params"] == stats["remaining_params"]

  before = {
    name: os.path.getmtime(os.path.join(base, name))
    for base, _, names in os.walk(workdir)
    for name in names
  }
  c.pruning.final_sparsity = 1.0
  with pytest.raises(ConfigError, match=r"final_sparsity must be in \[0, 1\); got 1.0"):
    train_and_evaluate(c, workdir)
  after = {
    name: os.path.getmtime(os.path.join(base, name))
    for base, _, names in os.walk(workdir)
    for name in names
  }
  assert after == before
