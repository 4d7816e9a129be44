"""What a task scores a model on: its loss sums, its metrics and its carry, by name.

A task names its objective (`TaskSpec.objective`); the one train step, the one
eval step and the one evaluator call the objective and never ask which task
they run. An objective supplies:

- `check(model_cls, model_cfg, task_name)`: a ConfigError if the model cannot
  serve it (a classifier on a language-model task, or the reverse).
- `init_carry(model, batch_size, training=...)`: what the model carries from
  one step to the next, or None. Classifiers carry nothing; a language model
  carries its recurrent memory (Transformer-XL's cache, RMT's tokens...). A
  carry lives in the train state, so it is sharded, donated and checkpointed
  with the parameters, and a resumed run goes on with the same memory.
- `apply(model, batch, carry, deterministic=...)`: (sums, new carry, aux).
  Sums are summed, not averaged ({"loss_sum", "correct_sum", "count"}), so
  micro-batches, devices and evaluation batches combine exactly; aux are
  auxiliary per-unit losses (the compressive memory's reconstruction), added
  to the training loss with the weight of one counted unit.
- `summarize(totals)`: the metrics of a whole evaluation from summed sums; its
  `count_name` key counts what was scored.

The best-checkpoint rule is the task's (`TaskSpec.best_metric/best_mode`).

Self-pretraining (`models.TokenPredictor`) reads a classification task's inputs with one of
`PRETRAINING`'s objectives instead (masked-token denoising, next-token prediction); an
objective with `needs_key` draws its randomness from a key the steps pass to `apply`.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from efficient_transformers.errors import ConfigError

SUM_KEYS = ("loss_sum", "correct_sum", "count")


def classification_sums(
  logits: jax.Array, targets: jax.Array, weights: jax.Array | None
) -> dict[str, jax.Array]:
  """Summed (not averaged) cross-entropy and correct count, with the weight total.

  logits [..., classes], targets [...]; `weights` (1 real, 0 padding) drop the
  eval pipeline's padding rows; None counts every target.
  """
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(losses * weights),
    "correct_sum": jnp.sum(correct * weights),
    "count": jnp.sum(weights),
  }


def lm_sums(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """Next-token sums over the real targets: id 0 (stream padding) counts nowhere.

  logits [batch, length, vocab], targets [batch, length]; `count` is the
  number of predicted tokens, so loss_sum / count is nats per token.
  """
  return classification_sums(logits, targets, (targets != 0).astype(jnp.float32))


def _mean_metrics(totals: dict) -> tuple[float, float, float]:
  totals = jax.device_get(totals)
  count = float(totals["count"])
  scale = max(count, 1.0)
  return float(totals["loss_sum"]) / scale, float(totals["correct_sum"]) / scale, count


class Classification:
  """One label per example: cross-entropy, accuracy; padding rows weighted out.

  Args:
    input_names: the batch fields the model reads, in its call order.
  """

  name = "classification"
  count_name = "num_examples"

  def __init__(self, input_names: Sequence[str]):
    self.input_names = tuple(input_names)

  @classmethod
  def from_config(cls, model_cls: type, model_cfg: ml_collections.ConfigDict):
    del model_cfg
    return cls(model_cls.input_names)

  @staticmethod
  def check(model_cls: type, model_cfg: ml_collections.ConfigDict, task_name: str) -> None:
    if hasattr(model_cls, "init_memory"):
      raise ConfigError(
        f"config.model.kind={model_cfg.kind!r} does not fit task {task_name!r}: it is a "
        "language model, and the task classifies examples (kind='classifier', or "
        "'dual_encoder' for retrieval)."
      )

  def init_carry(self, model, batch_size: int, *, training: bool):
    del model, batch_size, training
    return None

  def apply(self, model, batch: dict, carry, *, deterministic: bool):
    logits = model(*[batch[n] for n in self.input_names], deterministic=deterministic)
    return classification_sums(logits, batch["targets"], batch.get("weight")), carry, {}

  def summarize(self, totals: dict | None) -> dict[str, float]:
    if totals is None:
      return {"loss": math.nan, "accuracy": math.nan, self.count_name: 0.0}
    loss, accuracy, count = _mean_metrics(totals)
    return {"loss": loss, "accuracy": accuracy, self.count_name: count}


class NextToken:
  """Byte-level language modelling over ordered streams, the model's memory carried.

  Each batch row continues its stream from the previous step; `reset` rows
  start over with an empty memory. A training batch is `bptt_segments` model
  segments, run in order with gradients through the memory between them (the
  Transformer-XL kinds stop them anyway); the carry kept for the next step
  holds no gradient.

  Args:
    bptt_segments: segments per training batch row (config.model.bptt_segments).
    eval_lengths: memory sizes for evaluation, e.g. {"mem_len": 1600}
      (config.model.eval_mem_len); {} evaluates with the training ones.
  """

  name = "next_token"
  count_name = "num_tokens"
  input_names = ("inputs",)

  def __init__(self, bptt_segments: int = 1, eval_lengths: dict | None = None):
    self.bptt_segments = bptt_segments
    self.eval_lengths = dict(eval_lengths or {})

  @classmethod
  def from_config(cls, model_cls: type, model_cfg: ml_collections.ConfigDict):
    del model_cls
    eval_mem_len = model_cfg.get("eval_mem_len", 0)
    return cls(
      bptt_segments=int(model_cfg.get("bptt_segments") or 1),
      eval_lengths={"mem_len": eval_mem_len} if eval_mem_len and eval_mem_len > 0 else {},
    )

  @staticmethod
  def check(model_cls: type, model_cfg: ml_collections.ConfigDict, task_name: str) -> None:
    if not (hasattr(model_cls, "init_memory") and hasattr(model_cls, "run")):
      raise ConfigError(
        f"config.model.kind={model_cfg.kind!r} does not fit task {task_name!r}: a "
        "language-model task needs a model with a memory interface (kind='decoder_lm')."
      )

  def init_carry(self, model, batch_size: int, *, training: bool):
    return model.init_memory(batch_size, **({} if training else self.eval_lengths))

  def apply(self, model, batch: dict, carry, *, deterministic: bool):
    logits, carry, aux = model.run(
      batch["inputs"],
      carry,
      reset=batch["reset"],
      bptt_segments=self.bptt_segments,  # Truncates gradients only: evaluation is the same.
      deterministic=deterministic,
    )
    return lm_sums(logits, batch["targets"]), carry, aux

  def summarize(self, totals: dict | None) -> dict[str, float]:
    """loss (nats per token), accuracy, bits_per_byte (= loss / ln 2: a token is a byte)."""
    if totals is None:
      nan = math.nan
      return {"loss": nan, "accuracy": nan, "bits_per_byte": nan, self.count_name: 0.0}
    loss, accuracy, count = _mean_metrics(totals)
    return {
      "loss": loss,
      "accuracy": accuracy,
      "bits_per_byte": loss / math.log(2),
      self.count_name: count,
    }


class _Pretraining:
  """Self-pretraining on a classification task's own inputs (`models.TokenPredictor`):
  the task's labels are not read. Shared checks and summary of the two objectives below.

  `input_names` are the task's token fields: ("inputs",), or Retrieval's ("inputs1",
  "inputs2"), whose documents are stacked on the batch axis and each predicted alone (the
  paper pretrains on every document, not on pairs).
  """

  count_name = "num_predicted"
  input_names = ("inputs",)
  needs_key = False

  @staticmethod
  def check(model_cls: type, model_cfg: ml_collections.ConfigDict, task_name: str) -> None:
    if not getattr(model_cls, "pretraining", False):
      raise ConfigError(
        f"config.model.pretrain_objective scores token predictions: it needs "
        f"config.model.kind='token_predictor', not {model_cfg.kind!r}."
      )

  @classmethod
  def from_config(
    cls,
    model_cls: type,
    model_cfg: ml_collections.ConfigDict,
    vocab_size: int,
    input_names: Sequence[str] = ("inputs",),
  ):
    del model_cls
    return cls(**cls.config_kwargs(model_cfg, vocab_size), input_names=input_names)

  @classmethod
  def config_kwargs(cls, model_cfg: ml_collections.ConfigDict, vocab_size: int) -> dict:
    """The objective's own constructor arguments from config.model (none here)."""
    del model_cfg, vocab_size
    return {}

  def init_carry(self, model, batch_size: int, *, training: bool):
    del model, batch_size, training
    return None

  def summarize(self, totals: dict | None) -> dict[str, float]:
    if totals is None:
      return {"loss": math.nan, "accuracy": math.nan, self.count_name: 0.0}
    loss, accuracy, count = _mean_metrics(totals)
    return {"loss": loss, "accuracy": accuracy, self.count_name: count}


def _row_weights(batch: dict, shape) -> jax.Array:
  """The eval pipeline's per-row weight (0 for its padding rows) broadcast over positions."""
  weight = batch.get("weight")
  if weight is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(weight.astype(jnp.float32)[:, None], shape)


def _documents(batch: dict, names: Sequence[str]) -> tuple[jax.Array, jax.Array]:
  """(ids, row weights), both [documents, length]: the fields `names` stacked on the batch
  axis (one document per row), each row weighted as its example."""
  ids = [batch[n] for n in names]
  rows = [_row_weights(batch, x.shape) for x in ids]
  if len(ids) == 1:
    return ids[0], rows[0]
  return jnp.concatenate(ids, axis=0), jnp.concatenate(rows, axis=0)


class MaskedTokens(_Pretraining):
  """Masked-token denoising: a fraction `mask_rate` of the real tokens is replaced by the
  [MASK] id and predicted from the rest; the loss and accuracy count only those positions.

  Padding (id 0) is never masked and never predicted. Which tokens are masked is drawn
  from `key` (the train step derives one per step and micro-batch from the run's seed; the
  evaluation uses one fixed key, so every evaluation scores the same positions).

  Args:
    mask_rate: the fraction of real tokens masked, in (0, 1).
    mask_id: the [MASK] id (`TokenPredictor.mask_id`, the task's vocabulary size).
  """

  name = "masked_tokens"
  needs_key = True

  def __init__(self, mask_rate: float, mask_id: int, input_names: Sequence[str] = ("inputs",)):
    if not 0.0 < mask_rate < 1.0:
      raise ConfigError(f"config.model.mask_rate must be in (0, 1); got {mask_rate}.")
    self.mask_rate, self.mask_id = mask_rate, mask_id
    self.input_names = tuple(input_names)

  @classmethod
  def config_kwargs(cls, model_cfg: ml_collections.ConfigDict, vocab_size: int) -> dict:
    return {"mask_rate": float(model_cfg.get("mask_rate", 0.15)), "mask_id": vocab_size}

  def choose(self, ids: jax.Array, key: jax.Array) -> jax.Array:
    """bool [batch, length]: the real tokens to mask."""
    return jax.random.bernoulli(key, self.mask_rate, ids.shape) & (ids != 0)

  def apply(self, model, batch: dict, carry, *, deterministic: bool, key: jax.Array):
    ids, rows = _documents(batch, self.input_names)
    chosen = self.choose(ids, key)
    corrupted = jnp.where(chosen, jnp.asarray(self.mask_id, ids.dtype), ids)
    logits = model(corrupted, deterministic=deterministic)
    weights = chosen.astype(jnp.float32) * rows
    return classification_sums(logits, ids.astype(jnp.int32), weights), carry, {}


class NextTokens(_Pretraining):
  """Causal next-token prediction over the inputs (a causal encoder): position i predicts
  token i + 1; targets that are padding count nowhere."""

  name = "next_tokens"

  def __init__(self, input_names: Sequence[str] = ("inputs",)):
    self.input_names = tuple(input_names)

  def apply(self, model, batch: dict, carry, *, deterministic: bool):
    ids, rows = _documents(batch, self.input_names)
    logits = model(ids, deterministic=deterministic)[:, :-1]
    targets = ids[:, 1:].astype(jnp.int32)
    weights = (targets != 0).astype(jnp.float32) * rows[:, 1:]
    return classification_sums(logits, targets, weights), carry, {}


OBJECTIVES = {"classification": Classification, "next_token": NextToken}
PRETRAINING = {"masked_tokens": MaskedTokens, "next_tokens": NextTokens}


def make(
  name: str,
  model_cls: type,
  model_cfg: ml_collections.ConfigDict,
  task_name: str,
  vocab_size: int | None = None,
  token_fields: Sequence[str] = ("inputs",),
):
  """The objective `name` (a task's `objective`) for this model, checked against it.

  A pretraining model (`models.TokenPredictor`) gets `config.model.pretrain_objective`
  over the inputs of a classification task instead: its `token_fields`, each document alone.
  """
  if getattr(model_cls, "pretraining", False):
    chosen = model_cfg.get("pretrain_objective", "masked_tokens")
    if name != "classification" or chosen not in PRETRAINING:
      raise ConfigError(
        f"config.model.kind={model_cfg.kind!r} self-pretrains on a classification task's "
        f"inputs with config.model.pretrain_objective in {', '.join(PRETRAINING)}; got "
        f"task {task_name!r} ({name}) and pretrain_objective={chosen!r}."
      )
    PRETRAINING[chosen].check(model_cls, model_cfg, task_name)
    return PRETRAINING[chosen].from_config(model_cls, model_cfg, vocab_size, token_fields)
  if name not in OBJECTIVES:  # pragma: no cover - a task module out of step with this one.
    raise ConfigError(
      f"Task {task_name!r} has unknown objective {name!r}; valid: {list(OBJECTIVES)}."
    )
  OBJECTIVES[name].check(model_cls, model_cfg, task_name)
  return OBJECTIVES[name].from_config(model_cls, model_cfg)
