"""The byte-level LM through the one training system: train.py's loop, checkpoints, eval.py.

One small Transformer-XL run is shared by the module (trained once, in two
halves: a stop after 30 steps, then a resume to 60), against an uninterrupted
60-step twin: the resumed run must carry on with the checkpointed memory. The
other memory kinds train two steps each. The corpus is the offline stdlib
corpus, cut to 300 KB.
"""

import json
import math

import jax
import numpy as np
import pytest

from efficient_transformers.data import byte_corpus, tasks
from efficient_transformers.errors import CheckpointError, ConfigError
from efficient_transformers.training import (
  checkpointing,
  eval_lib,
  state,
  train_and_evaluate,
)
from tests.helpers import tiny_lm_config


def _restore(workdir, config, which="latest"):
  setup = state.make_setup(config, tasks.describe(config))
  ckpt = checkpointing.Checkpointer(str(workdir))
  step, train_state, _ = ckpt.restore(setup.abstract_state, which=which)
  ckpt.close()
  return step, jax.device_get(train_state)


@pytest.fixture(scope="module")
def xl_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lm")
  data = tmp / "data"
  straight = tiny_lm_config(data)
  train_and_evaluate(straight, str(tmp / "straight"))
  halves = tiny_lm_config(data, steps=30)
  train_and_evaluate(halves, str(tmp / "resumed"))
  _, halfway = _restore(tmp / "resumed", halves)
  train_and_evaluate(tiny_lm_config(data), str(tmp / "resumed"))
  return tmp, straight, halfway


def test_memory_is_checkpointed_and_a_resumed_run_continues_with_it(xl_runs):
  tmp, config, halfway = xl_runs
  memory = halfway["carry"]
  # The checkpoint holds the memory of the step it was saved at: full and in use.
  assert memory["hidden"].shape == (1, config.batch_size, 16, 32)
  assert memory["valid"].all() and np.abs(memory["hidden"]).sum() > 0
  _, resumed = _restore(tmp / "resumed", config)
  _, straight = _restore(tmp / "straight", config)
  # Had the resume started from an empty memory, step 31's loss and every later
  # update would differ; the parameters and the memory match the straight run.
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  lines = [json.loads(line) for line in open(tmp / "resumed" / "metrics.jsonl")]
  assert [r["step"] for r in lines if r["split"] == "train"] == [10, 20, 30, 40, 50, 60]


def test_validation_and_eval_report_bits_per_byte_below_the_unigram_entropy(xl_runs):
  tmp, config, _ = xl_runs
  validation = json.loads((tmp / "straight" / "validation.json").read_text())
  assert validation["bits_per_byte"] == pytest.approx(validation["loss"] / math.log(2))
  results = eval_lib.evaluate_checkpoint(config, str(tmp / "straight"))
  assert results == json.loads((tmp / "straight" / "results.json").read_text())
  test = results["test"]
  assert results["memory"] == "transformer_xl" and results["checkpoint"] == "best"
  assert test["bits_per_byte"] == pytest.approx(test["loss"] / math.log(2))
  # The whole test split: every token but the first is predicted once.
  tokens = tasks.load(config, generate=False).splits["test"]["tokens"]
  assert results["num_tokens"] == tokens.size - 1
  # Sixty steps already beat predicting bytes by their frequency alone.
  train = tasks.load(config, generate=False).splits["train"]["tokens"]
  entropy = byte_corpus.unigram_entropy_bits(train)
  assert 4.0 < entropy < 5.5
  assert test["bits_per_byte"] < entropy
  # A longer evaluation memory than training's: the same checkpoint, no fingerprint clash.
  longer = tiny_lm_config(tmp / "data")
  longer.model.eval_mem_len = 96
  again = eval_lib.evaluate_checkpoint(longer, str(tmp / "straight"), split="validation")
  assert again["step"] == results["step"] and 0 < again["validation"]["bits_per_byte"] < 10


def test_checkpoint_of_another_memory_type_is_refused(xl_runs):
  tmp, _, _ = xl_runs
  config = tiny_lm_config(tmp / "data", memory="rmt")
  with pytest.raises(CheckpointError, match="memory") as error:
    train_and_evaluate(config, str(tmp / "straight"))
  assert "transformer_xl" in str(error.value) and "rmt" in str(error.value)


@pytest.mark.parametrize("memory", ["none", "compressive", "rmt"])
def test_each_memory_kind_trains_two_steps(memory, tmp_path):
  config = tiny_lm_config(tmp_path / "data", memory=memory, steps=2)
  config.eval_every_steps = config.checkpoint_every_steps = 2
  metrics = train_and_evaluate(config, str(tmp_path / "run"))
  assert math.isfinite(metrics["bits_per_byte"]) and 0 < metrics["bits_per_byte"] < 10
  lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  train = [r for r in lines if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2] or [r["step"] for r in train] == [2]
  if memory == "compressive":
    assert all(math.isfinite(r["aux_attention_reconstruction"]) for r in train)


@pytest.mark.parametrize(
  "key, value, message",
  [
    # Not anchored at the end: pytest matches JAX's traceback note after the message.
    ("mem_len", -1, r"mem_len=-1 .*must be an integer >= 0\. \(set by config\.model\.mem_len\)"),
    ("segment_length", 15, r"compression_rate=\d+\. \(set by config\.model\.segment_length\)"),
  ],
)
def test_bad_memory_settings_are_config_errors(key, value, message, tmp_path):
  config = tiny_lm_config(tmp_path / "data", memory="compressive", steps=2)
  config.model[key] = value
  with pytest.raises(ConfigError, match=message):
    train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("kind", ["classifier", "nope"])
def test_a_classifier_on_the_lm_task_is_a_config_error(kind, tmp_path):
  config = tiny_lm_config(tmp_path / "data", steps=2)
  config.model.kind = kind
  message = "does not fit task 'byte_lm/stdlib'" if kind == "classifier" else "is unknown; valid"
  with pytest.raises(ConfigError, match=message):
    train_and_evaluate(config, str(tmp_path / "run"))
  with pytest.raises(ConfigError, match=message):  # eval.py checks the same before building
    eval_lib.evaluate_checkpoint(config, str(tmp_path / "run"))
