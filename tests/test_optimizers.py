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


def test_cosine_schedule_warms_up_and_decays_to_zero():
  sched = optimizers.learning_rate_schedule(
    _cfg(learning_rate=1e-3, schedule="cosine", warmup_steps=10), 100
  )
  assert float(sched(0)) == pytest.approx(0.0)
  assert float(sched(10)) == pytest.approx(1e-3, rel=1e-5)
  assert float(sched(55)) == pytest.approx(0.5e-3, rel=1e-2)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)


def test_bad_optimizer_settings_name_the_key():
  with pytest.raises(ConfigError, match="schedule"):
    optimizers.learning_rate_schedule(_cfg(schedule="linear"), 10)
  with pytest.raises(ConfigError, match="grad_accum_steps"):
    optimizers.make_optimizer(_cfg(grad_accum_steps=0), 10)
