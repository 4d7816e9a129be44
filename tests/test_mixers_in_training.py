"""The baseline mixers in the models, by name like an attention: classifier, LM, LRA runner.

Every test parametrizes over `mixers.available()`, so a newly registered mixer
is tested here without a line added.
"""

import contextlib
import io

import jax
import numpy as np
import pytest
from flax import nnx

from configs.lm import byte_lm as byte_lm_config
from configs.lra import listops as listops_config
from efficient_transformers import attention, mixers
from efficient_transformers.benchmarks import lra
from efficient_transformers.data import tasks
from efficient_transformers.errors import ConfigError
from efficient_transformers.models import DecoderLM, mixing
from efficient_transformers.training import sharding, state, train_lib
from tests.test_lm_attention import lm_config, random_bytes, train_two_sharded_steps
from tests.test_models_in_training import small, synthetic_batch

pytestmark = pytest.mark.spread

CAUSAL_MIXERS = mixers.available(causal=True)


def test_a_mixer_is_named_like_an_attention():
  assert mixing.available() == [*attention.available(), *mixers.available()]
  assert {"lstm", "gru", "conv", "s4d"} <= set(mixers.available())
  with pytest.raises(ConfigError, match="Attentions: .*softmax.*; mixers: .*lstm"):
    mixing.get_class("transformer")


@pytest.mark.parametrize("name", mixers.available())
def test_the_classifier_trains_two_sharded_steps(name):
  config = listops_config.get_config(f"smoke,attention={name}")
  small(config)
  config.model.num_layers = 1
  spec = tasks.describe(config)
  setup = train_lib._build(config, spec)
  step_fn = train_lib._compile_train_step(config, spec, setup)
  train_state = state.init_state(setup)
  before = jax.device_get(train_state["params"])
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = synthetic_batch(spec, config.batch_size, rng)
    train_state, metrics = step_fn(train_state, sharding.global_batch(batch, setup.batch_sharding))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  after = jax.device_get(train_state["params"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after))
  assert sum(changed) > len(changed) // 2


@pytest.mark.parametrize("name", CAUSAL_MIXERS)
def test_lm_later_bytes_leave_earlier_logits_unchanged(name):
  config = lm_config(name)
  model = state.build_model(config.model, vocab_size=257, num_classes=0, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  @jax.jit
  def logits(params, ids):
    lm = nnx.merge(graphdef, params)
    return lm(ids, lm.init_memory(ids.shape[0]))[0]

  length, t = config.model.segment_length, 37
  ids = random_bytes(0, (2, length))
  changed = ids.copy()
  changed[:, t + 1 :] = random_bytes(1, (2, length - t - 1))
  before, after = np.asarray(logits(params, ids)), np.asarray(logits(params, changed))
  np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], atol=1e-5)
  assert np.abs(after[:, t + 1 :] - before[:, t + 1 :]).max() > 1e-3


@pytest.mark.parametrize("name", CAUSAL_MIXERS)
def test_lm_trains_two_sharded_steps(name):
  train_two_sharded_steps(lm_config(name))


def test_a_memory_or_a_position_scheme_with_a_mixer_is_refused_by_name():
  with pytest.raises(ConfigError, match="add memory=none"):
    byte_lm_config.get_config("smoke,attention=lstm,memory=transformer_xl")
  sizes = dict(num_layers=1, emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, segment_length=8)
  with pytest.raises(ConfigError, match="mixer 'gru' takes none") as error:
    DecoderLM(
      **sizes, memory="transformer_xl", positional="none", attention_name="gru", rngs=nnx.Rngs(0)
    )
  assert error.value.argument == "memory"
  config = listops_config.get_config("smoke,attention=lstm")
  config.model.positional = "rope"
  with pytest.raises(
    ConfigError, match=r"'lstm' takes no position scheme.*config\.model\.positional"
  ):
    state.build_model(config.model, vocab_size=20, num_classes=10, rngs=nnx.Rngs(0))


def test_the_lra_runner_takes_a_mixer_as_a_row(tmp_path):
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    rc = lra.main(
      [f"--workdir={tmp_path}", "--tasks=listops", "--attentions=lstm", "--smoke", "--dry_run"]
    )
  assert rc == 0, out.getvalue()
  assert "listops:lstm: compiles" in out.getvalue()


@pytest.mark.parametrize("name", ["s4d", "lru", "s5"])
def test_the_ssm_group_trains_at_its_own_rate_in_the_sharded_step(name):
  # ssm_learning_rate=0 freezes exactly the state-space parameters; the rest train.
  config = listops_config.get_config(f"smoke,attention={name}")
  small(config)
  config.model.num_layers = 1
  config.optimizer.ssm_learning_rate = 0.0
  spec = tasks.describe(config)
  setup = train_lib._build(config, spec)
  step_fn = train_lib._compile_train_step(config, spec, setup)
  train_state = state.init_state(setup)
  before = jax.device_get(train_state["params"])
  batch = synthetic_batch(spec, config.batch_size, np.random.default_rng(0))
  for _ in range(2):
    train_state, _ = step_fn(train_state, sharding.global_batch(batch, setup.batch_sharding))
  after = jax.device_get(train_state["params"])
  flat = jax.tree_util.tree_leaves_with_path(before)
  moved = {
    jax.tree_util.keystr(path): not np.array_equal(a, b)
    for (path, a), b in zip(flat, jax.tree.leaves(after), strict=True)
  }
  ssm = {k: v for k, v in moved.items() if k.split("'")[-2] in mixers.SSM_PARAMETER_NAMES}
  assert ssm and not any(ssm.values()), ssm
  rest = [v for k, v in moved.items() if k not in ssm]
  assert sum(rest) > len(rest) // 2
