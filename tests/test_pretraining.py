"""Self-pretraining objectives on a task's own inputs (`models.TokenPredictor`,
`objectives.MaskedTokens`, `objectives.NextTokens`): what is masked, what is scored, and
a token predictor trained through the one loop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import models
from efficient_transformers.errors import ConfigError
from efficient_transformers.training import objectives, state
from efficient_transformers.training.train_lib import train_and_evaluate
from tests.helpers import tiny_config


class _Fixed:
  """A stand-in model: fixed logits, and a record of the ids it was given."""

  def __init__(self, logits):
    self.logits, self.seen = logits, None

  def __call__(self, ids, *, deterministic):
    del deterministic
    self.seen = ids
    return self.logits


def _ids(rng, batch=4, length=12, vocab=9):
  ids = rng.integers(1, vocab, size=(batch, length))
  for row, real in enumerate((12, 7, 3, 0)):  # Right padding; the last row is all padding.
    ids[row, real:] = 0
  return jnp.asarray(ids, jnp.int32)


def test_masked_loss_counts_only_masked_real_positions():
  rng = np.random.default_rng(0)
  ids = _ids(rng)
  logits = jnp.asarray(rng.normal(size=(*ids.shape, 9)), jnp.float32)
  objective = objectives.MaskedTokens(mask_rate=0.4, mask_id=9)
  model = _Fixed(logits)
  key = jax.random.key(3)
  sums, _, _ = objective.apply(model, {"inputs": ids}, None, deterministic=True, key=key)
  chosen = np.asarray(objective.choose(ids, key))
  real = np.asarray(ids) != 0
  assert chosen.any() and not (chosen & ~real).any()  # Padding is never masked.
  # The model saw [MASK] exactly at the chosen positions, the tokens elsewhere.
  np.testing.assert_array_equal(np.asarray(model.seen), np.where(chosen, 9, np.asarray(ids)))
  # The loss and accuracy are the chosen positions' alone (a naive loop).
  loss = correct = 0.0
  for b, i in zip(*np.nonzero(chosen), strict=True):
    row = np.asarray(logits[b, i], np.float64)
    loss += np.log(np.sum(np.exp(row))) - row[ids[b, i]]
    correct += float(np.argmax(row) == ids[b, i])
  assert float(sums["count"]) == chosen.sum()
  np.testing.assert_allclose(float(sums["loss_sum"]), loss, rtol=1e-5)
  assert float(sums["correct_sum"]) == correct
  # Over many draws the masked fraction of real tokens is the rate.
  many = [objective.choose(ids, jax.random.key(k)) for k in range(200)]
  fraction = np.mean([np.asarray(m)[real].mean() for m in many])
  assert abs(fraction - 0.4) < 0.03
  # The eval pipeline's padding rows (weight 0) count nowhere.
  weighted, _, _ = objective.apply(
    model,
    {"inputs": ids, "weight": jnp.asarray([1.0, 0.0, 1.0, 1.0])},
    None,
    deterministic=True,
    key=key,
  )
  assert float(weighted["count"]) == chosen.sum() - chosen[1].sum()


def test_next_tokens_never_predicts_padding():
  rng = np.random.default_rng(1)
  ids = _ids(rng)
  logits = jnp.asarray(rng.normal(size=(*ids.shape, 9)), jnp.float32)
  sums, _, _ = objectives.NextTokens().apply(
    _Fixed(logits), {"inputs": ids}, None, deterministic=True
  )
  loss, count = 0.0, 0
  for b in range(ids.shape[0]):
    for i in range(ids.shape[1] - 1):
      target = int(ids[b, i + 1])
      if target == 0:
        continue
      row = np.asarray(logits[b, i], np.float64)
      loss += np.log(np.sum(np.exp(row))) - row[target]
      count += 1
  assert float(sums["count"]) == count == 11 + 6 + 2
  np.testing.assert_allclose(float(sums["loss_sum"]), loss, rtol=1e-5)


def test_token_predictor_shares_the_classifiers_encoder():
  c = tiny_config("/nonexistent")
  kwargs = dict(vocab_size=20, num_classes=10, rngs=nnx.Rngs(0))
  classifier = state.build_model(c.model, **kwargs)
  c.model.kind = "token_predictor"
  predictor = state.build_model(c.model, **kwargs)
  a = nnx.to_pure_dict(nnx.state(classifier.encoder, nnx.Param))
  b = nnx.to_pure_dict(nnx.state(predictor.encoder, nnx.Param))
  paths = lambda t: [p for p, _ in jax.tree_util.tree_leaves_with_path(t)]
  assert paths(a) == paths(b)
  # One embedding row more: the [MASK] id.
  assert (
    b["embed"]["tokens"]["embedding"].shape[0] == a["embed"]["tokens"]["embedding"].shape[0] + 1
  )
  ids = jnp.asarray([[3, 4, 20, 0]])
  assert predictor(ids).shape == (1, 4, 20)


def test_a_causal_objective_on_a_bidirectional_only_attention_is_refused():
  c = tiny_config("/nonexistent", attention="linformer")
  c.model.kind, c.model.pretrain_objective = "token_predictor", "next_tokens"
  with pytest.raises(ConfigError, match=r"linformer.*causal"):
    state.build_model(c.model, vocab_size=20, num_classes=10, rngs=nnx.Rngs(0))
  c.model.pretrain_objective = "masked"
  with pytest.raises(ConfigError, match=r"config.model.pretrain_objective"):
    state.build_model(c.model, vocab_size=20, num_classes=10, rngs=nnx.Rngs(0))
  assert models.MODELS["token_predictor"].pretraining


@pytest.mark.parametrize("objective", ["masked_tokens", "next_tokens"])
def test_token_predictor_trains_through_the_loop(objective, tmp_path):
  c = tiny_config(tmp_path / "data", steps=4)
  c.model.kind, c.model.pretrain_objective, c.model.mask_rate = "token_predictor", objective, 0.3
  last = train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(last["loss"]) and 0 <= last["accuracy"] <= 1 and last["num_predicted"] > 0
  with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
  # Evaluation draws the same masks every time: eval.py scores the checkpoint as the run did.
  from efficient_transformers.training import eval_lib

  scored = eval_lib.evaluate_checkpoint(
    c, str(tmp_path / "run"), split="validation", results_path=tmp_path / "r.json"
  )
  assert scored["validation"]["loss"] == pytest.approx(last["loss"], rel=1e-6)
  assert scored["num_predicted"] == last["num_predicted"]


def test_retrieval_pretrains_each_document_alone():
  """Retrieval's two documents are stacked on the batch axis: each row is one document,
  scored as that document alone (a naive loop), and a padding pair counts nowhere."""
  rng = np.random.default_rng(2)
  first, second = _ids(rng), _ids(rng)[::-1]
  batch = {"inputs1": first, "inputs2": second, "weight": jnp.asarray([1.0, 1.0, 0.0, 1.0])}
  logits = jnp.asarray(rng.normal(size=(8, 12, 9)), jnp.float32)
  names = ("inputs1", "inputs2")
  causal = objectives.NextTokens(names)
  model = _Fixed(logits)
  sums, _, _ = causal.apply(model, batch, None, deterministic=True)
  np.testing.assert_array_equal(np.asarray(model.seen), np.concatenate([first, second]))
  loss, count = 0.0, 0
  for doc, ids in enumerate([*np.asarray(first), *np.asarray(second)]):
    if doc % 4 == 2:  # Row 2's pair is the eval pipeline's padding.
      continue
    for i in range(len(ids) - 1):
      if ids[i + 1]:
        row = np.asarray(logits[doc, i], np.float64)
        loss += np.log(np.sum(np.exp(row))) - row[ids[i + 1]]
        count += 1
  assert float(sums["count"]) == count
  np.testing.assert_allclose(float(sums["loss_sum"]), loss, rtol=1e-5)
  masked = objectives.MaskedTokens(0.4, mask_id=9, input_names=names)
  key = jax.random.key(5)
  sums, _, _ = masked.apply(_Fixed(logits), batch, None, deterministic=True, key=key)
  chosen = np.array(masked.choose(jnp.concatenate([first, second]), key))
  chosen[[2, 6]] = False  # The padding pair's rows.
  assert float(sums["count"]) == chosen.sum() > 0
  # The objective reads the task's token fields: Retrieval's SPT pretrains on both.
  c = tiny_config("/nonexistent")
  c.model.kind = "token_predictor"
  from efficient_transformers.data import tasks

  c.task = "retrieval"
  spec = tasks.describe(c)
  assert state.make_objective(c.model, spec).input_names == names
