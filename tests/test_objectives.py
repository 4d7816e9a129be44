"""One training loop: the task's objective supplies loss, metrics and carry; nothing forks."""

import ast
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_transformers.data import tasks
from efficient_transformers.errors import CheckpointError, ConfigError
from efficient_transformers.training import checkpointing, objectives, state
from efficient_transformers.training.evaluation import evaluate, model_fingerprint
from efficient_transformers.training.train_lib import train_and_evaluate
from tests.helpers import tiny_config, tiny_lm_config

TRAINING = pathlib.Path(__file__).resolve().parents[1] / "efficient_transformers" / "training"


def test_classification_sums_and_summary_are_the_hand_computed_ones():
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]]))
  targets = jnp.array([0, 1, 2])
  weights = jnp.array([1.0, 1.0, 0.0])  # The third row is padding.
  sums = objectives.classification_sums(logits, targets, weights)
  np.testing.assert_allclose(sums["loss_sum"], -math.log(0.7) - math.log(0.1), rtol=1e-6)
  assert float(sums["correct_sum"]) == 1.0 and float(sums["count"]) == 2.0
  summary = objectives.Classification(("inputs",)).summarize(sums)
  assert summary["accuracy"] == 0.5 and summary["num_examples"] == 2.0
  np.testing.assert_allclose(summary["loss"], -(math.log(0.7) + math.log(0.1)) / 2, rtol=1e-6)


def test_next_token_counts_only_real_targets_and_reports_bits_per_byte():
  logits = jnp.log(jnp.full((1, 3, 4), 0.25))  # Uniform over 4 tokens: 2 bits each.
  targets = jnp.array([[2, 0, 3]])  # 0 is stream padding.
  sums = objectives.lm_sums(logits, targets)
  assert float(sums["count"]) == 2.0
  summary = objectives.NextToken().summarize(sums)
  np.testing.assert_allclose(summary["bits_per_byte"], 2.0, rtol=1e-6)
  assert summary["num_tokens"] == 2.0
  assert math.isnan(objectives.NextToken().summarize(None)["loss"])


def test_evaluate_hands_the_carry_from_batch_to_batch():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  seen = []

  def step(params, carry, batch):  # Counts its calls in the carry, as a memory would grow.
    seen.append(int(carry))
    one = jnp.ones((), jnp.float32)
    return {"loss_sum": params * one, "correct_sum": one, "count": one}, carry + 1

  batches = [{"inputs": np.zeros((2, 3), np.int32)} for _ in range(4)]
  got = evaluate(step, 0.5, 10, batches, batch_sharding, objectives.NextToken(), max_batches=3)
  assert seen == [10, 11, 12]
  assert got["loss"] == pytest.approx(0.5) and got["num_tokens"] == 3.0


def test_a_language_model_on_a_classification_task_is_refused_by_name(tmp_path):
  config = tiny_config(tmp_path)
  config.model.kind = "decoder_lm"
  with pytest.raises(ConfigError, match="decoder_lm.*does not fit task 'listops'"):
    state.make_objective(config.model, tasks.describe(config))


def _tree(path: pathlib.Path) -> dict:
  return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}


def test_a_resume_with_another_stream_layout_is_refused_and_keeps_the_run(tmp_path):
  config = tiny_lm_config(tmp_path / "data", steps=2)
  config.eval_every_steps = config.checkpoint_every_steps = 2
  config.num_eval_batches = 1
  workdir = tmp_path / "run"
  train_and_evaluate(config, str(workdir))
  before = _tree(workdir)
  config.model.bptt_segments = 2  # Two segments per row and step: other batches.
  config.num_train_steps = 4
  with pytest.raises(CheckpointError, match="data order.*'segment_length': 16") as error:
    train_and_evaluate(config, str(workdir))
  assert "'segment_length': 32" in str(error.value)
  after = _tree(workdir)
  assert {k: v for k, v in after.items() if "lock" not in k} == {
    k: v for k, v in before.items() if "lock" not in k
  }


def test_a_checkpoint_of_the_older_state_layout_is_refused_naming_it(tmp_path):
  config = tiny_config(tmp_path / "data", steps=2)
  spec = tasks.describe(config)
  old = model_fingerprint(config, spec)
  del old["state_layout"]  # As saved before the carry was named.
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run"), fingerprint=old)
  ckpt.save(2, {"params": {"w": jnp.zeros(2)}}, data_state={"train_iterator": {}, "order": {}})
  ckpt.close()
  with pytest.raises(CheckpointError, match=r"state_layout \(only in current: 2\)"):
    train_and_evaluate(config, str(tmp_path / "run"))
  assert checkpointing.Checkpointer(str(tmp_path / "run")).latest_step() == 2


def _attributes_and_names(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      found.add(node.attr)
    elif isinstance(node, ast.Name):
      found.add(node.id)
    elif isinstance(node, ast.FunctionDef):
      found.add(node.name)
  return found


@pytest.mark.parametrize(
  "module", ["train_lib.py", "eval_lib.py", "steps.py", "evaluation.py", "state.py"]
)
def test_the_loop_the_steps_and_the_evaluator_never_ask_which_task_they_run(module):
  # What the classifier/stream forks read before the objectives: a task's `stream`
  # flag, a model's memory interface, or twin functions named for one kind of task.
  names = _attributes_and_names(TRAINING / module)
  asked = {n for n in names if n in ("stream", "init_memory", "run")}
  twins = {n for n in names if "recurrent" in n or "stream" in n}
  assert not asked | twins, f"{module} forks on the task: {sorted(asked | twins)}"


def test_the_saved_data_order_names_the_stream_layout(tmp_path):
  config = tiny_lm_config(tmp_path / "data", steps=2)
  task = tasks.load(config)
  order = task.batching.order(task.splits["train"])
  assert order["segment_length"] == config.model.segment_length
  assert order["num_tokens"] == task.splits["train"]["tokens"].size
  json.dumps(order)  # Saved as JSON with the checkpoint.


@pytest.mark.parametrize(
  ("key", "value", "same"),
  [
    ("remat_policy", "dots_saveable", True),  # Rematerialization changes no parameter.
    ("dropout_rate", 0.3, True),
    ("scan_layers", True, False),  # Stacked parameters: another layout.
    ("share_layers", "all", False),
  ],
)
def test_the_fingerprint_ignores_only_what_changes_no_parameter(tmp_path, key, value, same):
  config = tiny_config(tmp_path)
  spec = tasks.describe(config)
  before = model_fingerprint(config, spec)
  config.model[key] = value
  assert (model_fingerprint(config, spec) == before) is same
