"""LRA's learning-rate schedules and the optimizer chain."""

import math

import ml_collections
import pytest

from efficient_transformers.errors import ConfigError
from efficient_transformers.training import optimizers


def _cfg(**kw):
  base = dict(
    learning_rate=0.05,
    schedule="rsqrt",
    warmup_steps=1000,
    weight_decay=0.1,
    b1=0.9,
    b2=0.98,
    eps=1e-9,
    grad_clip_norm=0.0,
    grad_accum_steps=1,
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_rsqrt_schedule_matches_lra_formula():
  sched = optimizers.learning_rate_schedule(_cfg(), 5000)
  # The original counts steps from 1: lr(t) = 0.05 * min(1, t/1000) / sqrt(max(t, 1000)).
  for step in (0, 499, 999, 1999, 4999):
    t = step + 1
    expected = 0.05 * min(1.0, t / 1000) / math.sqrt(max(t, 1000))
    assert float(sched(step)) == pytest.approx(expected, rel=1e-5)
  assert float(sched(999)) == pytest.approx(0.05 / math.sqrt(1000), rel=1e-5)  # ~1.58e-3 peak.


def test_cosine_and_constant_schedules_count_steps_from_one():
  cfg = _cfg(learning_rate=1e-3, schedule="cosine", warmup_steps=10)
  sched = optimizers.learning_rate_schedule(cfg, 100)
  assert float(sched(0)) == pytest.approx(1e-4, rel=1e-5)  # The first update is not wasted.
  assert float(sched(9)) == pytest.approx(1e-3, rel=1e-5)
  assert float(sched(54)) == pytest.approx(0.5e-3, rel=1e-4)  # Halfway down the cosine.
  assert float(sched(99)) == pytest.approx(0.0, abs=1e-9)
  flat = optimizers.learning_rate_schedule(_cfg(schedule="constant", warmup_steps=0), 100)
  assert float(flat(0)) == float(flat(50)) == pytest.approx(0.05)


def test_optimizer_is_adamw_with_decoupled_decay_and_clipping():
  import jax.numpy as jnp

  cfg = _cfg(schedule="constant", warmup_steps=0, learning_rate=0.1, weight_decay=0.5)
  tx, _ = optimizers.make_optimizer(cfg, 10)
  params = {"w": jnp.array([2.0])}
  updates, _ = tx.update({"w": jnp.array([0.0])}, tx.init(params), params)
  # Zero gradient: Adam's step is 0, so only the decay acts: -lr * wd * w.
  assert float(updates["w"][0]) == pytest.approx(-0.1 * 0.5 * 2.0, rel=1e-5)
  # eps=1 makes Adam's first step g / (|g| + 1) depend on |g|, so clipping shows:
  # a 1e6 gradient clipped to norm 1 must step exactly like a gradient of 1.
  clipped, _ = optimizers.make_optimizer(
    _cfg(grad_clip_norm=1.0, weight_decay=0.0, eps=1.0, schedule="constant", warmup_steps=0), 10
  )
  g = {"w": jnp.array([1e6])}
  u1, _ = clipped.update(g, clipped.init(params), params)
  u2, _ = clipped.update({"w": jnp.array([1.0])}, clipped.init(params), params)
  assert float(u1["w"][0]) == pytest.approx(float(u2["w"][0]), rel=1e-4)
  assert float(u2["w"][0]) == pytest.approx(-0.05 * 0.5, rel=1e-3)  # lr x 1 / (1 + 1).


def test_bad_optimizer_settings_name_the_key():
  with pytest.raises(ConfigError, match="schedule"):
    optimizers.learning_rate_schedule(_cfg(schedule="linear"), 10)
  with pytest.raises(ConfigError, match="grad_accum_steps"):
    optimizers.make_optimizer(_cfg(grad_accum_steps=0), 10)


# ---------------------------------------------------------------- The state-space group.


def _params():
  import jax.numpy as jnp

  ones = jnp.ones(3)
  return {"s4d": {"log_dt": ones, "Lambda_re": ones, "C": ones}, "out": {"kernel": ones}}


def test_ssm_parameters_take_their_own_rate_and_no_weight_decay():
  import jax
  import jax.numpy as jnp

  cfg = _cfg(schedule="constant", warmup_steps=0, learning_rate=1e-3, weight_decay=0.5)
  cfg.ssm_learning_rate, cfg.ssm_weight_decay = 2e-3, 0.0
  tx, _ = optimizers.make_optimizer(cfg, 10)
  params = _params()
  assert optimizers.ssm_labels(params) == {
    "s4d": {"log_dt": "ssm", "Lambda_re": "ssm", "C": "default"},
    "out": {"kernel": "default"},
  }
  # Zero gradients: only weight decay moves a parameter, lr x decay x p in the default group.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["s4d"]["log_dt"]).max()) == 0.0
  assert float(jnp.abs(updates["s4d"]["Lambda_re"]).max()) == 0.0
  assert float(updates["out"]["kernel"][0]) == pytest.approx(-1e-3 * 0.5)
  # Unit gradients, decay off: Adam's first step is -lr x g / (|g| + eps), twice as large in
  # the SSM group.
  cfg.weight_decay = 0.0
  tx, _ = optimizers.make_optimizer(cfg, 10)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  assert float(updates["s4d"]["log_dt"][0]) == pytest.approx(-2e-3, rel=1e-5)
  assert float(updates["s4d"]["C"][0]) == pytest.approx(-1e-3, rel=1e-5)


def test_without_an_ssm_rate_the_optimizer_state_keeps_the_one_group_layout():
  import jax
  import optax

  cfg = _cfg(schedule="constant", warmup_steps=0)
  tx, _ = optimizers.make_optimizer(cfg, 10)
  plain = optax.chain(optax.adamw(optax.constant_schedule(1e-3)))
  assert jax.tree.structure(tx.init(_params())) == jax.tree.structure(plain.init(_params()))


def test_a_negative_ssm_rate_is_refused_by_key():
  cfg = _cfg()
  cfg.ssm_learning_rate = -1.0
  with pytest.raises(ConfigError, match="config.optimizer.ssm_learning_rate"):
    optimizers.make_optimizer(cfg, 10)
