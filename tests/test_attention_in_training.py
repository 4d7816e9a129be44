"""Every registered attention trains inside the sharded train step (fake 8-device mesh).

The model and the attention kwargs are the ListOps smoke config's
(`configs/lra/listops.py:smoke,attention=NAME`: width 64, 4 heads, 65 positions, batch
32, the smoke attention kwargs), with one layer instead of two (half the compile time,
the same attention code) and a cut-down data set.
"""

import jax
import numpy as np
import pytest

from configs.lra import listops as listops_config
from efficient_transformers import attention
from efficient_transformers.data import pipeline, tasks
from efficient_transformers.training import sharding, state

# Independent tests: the xdist workers share them one by one (tests/conftest.py).
pytestmark = pytest.mark.spread


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("listops_smoke_small")


@pytest.mark.parametrize(
  "name,positional",
  [(name, "sinusoidal") for name in attention.available()]
  + [("linear", "rope"), ("softmax", "alibi"), ("local", "axial")],
)
def test_smoke_config_trains_in_the_sharded_step(name, positional, data_dir):
  config = listops_config.get_config(f"smoke,attention={name}")
  config.model.positional = positional
  config.data_dir = str(data_dir)
  config.data.num_train, config.data.num_val, config.data.num_test = 64, 8, 8
  config.model.num_layers = 1
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  task = tasks.load(config)
  setup = state.make_setup(config, tasks.describe(config))
  step_fn = setup.compile_train_step(
    setup.batch_spec(task.splits["train"], config.batch_size), seed=config.seed
  )
  it = pipeline.train_iterator(task.splits["train"], global_batch_size=config.batch_size, seed=0)
  train_state = state.init_state(setup)
  before = jax.device_get(train_state["params"])
  for _ in range(2):
    train_state, metrics = step_fn(
      train_state, sharding.global_batch(next(it), setup.batch_sharding)
    )
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  after = jax.device_get(train_state["params"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after))
  assert sum(changed) > len(changed) // 2  # The attention's parameters among them train.
