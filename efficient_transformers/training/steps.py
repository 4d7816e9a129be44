"""The jitted train and eval steps, as pure functions of a state pytree.

The train state is a plain pytree, the unit of sharding, donation and
checkpointing:
  {"params": nested dict of arrays, "opt_state": optax state, "step": int32}
The model's graph definition and its non-parameter state (dropout RNG streams)
are closed over; dropout keys are re-derived from (seed, step) every step, so
a resumed run draws exactly the masks an uninterrupted one would.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

_DROPOUT_STREAM = 0x64726F70  # "drop"


def classification_sums(
  logits: jax.Array, targets: jax.Array, weights: jax.Array | None
) -> dict[str, jax.Array]:
  """Summed (not averaged) loss and correct count, with the example count.

  Sums let micro-batches, devices and eval batches combine exactly; `weights`
  (1 real, 0 padding) drop the eval pipeline's padding examples.
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
  weights = (targets != 0).astype(jnp.float32)
  return classification_sums(logits, targets, weights)


def _apply_model(graphdef, params, rest, batch, input_names, *, deterministic, dropout_key=None):
  # Fresh Variables for this trace: the closed-over `rest` was made outside it,
  # and reseeding must not mutate state owned by another trace level.
  model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
  if dropout_key is not None:
    nnx.reseed(model, dropout=dropout_key)
  return model(*[batch[n] for n in input_names], deterministic=deterministic)


def make_train_step(
  *,
  graphdef: nnx.GraphDef,
  rest: nnx.State,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  input_names: Sequence[str],
  seed: int,
  grad_accum_steps: int = 1,
) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics); jit it with the state donated.

  With grad_accum_steps = k the global batch is split into k micro-batches run
  one after another (lax.scan) and their gradients summed, so one step still
  makes one optimizer update over the whole batch, with about 1/k the
  activation memory.
  """
  # Its own stream: parameter init draws from jax.random.key(seed) itself.
  base_key = jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM)

  def sums_and_grads(params, batch, dropout_key):
    def loss_fn(p):
      logits = _apply_model(
        graphdef, p, rest, batch, input_names, deterministic=False, dropout_key=dropout_key
      )
      sums = classification_sums(logits, batch["targets"], batch.get("weight"))
      return sums["loss_sum"], sums

    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return sums, grads

  def train_step(state, batch):
    step = state["step"]
    params = state["params"]
    step_key = jax.random.fold_in(base_key, step)
    if grad_accum_steps == 1:
      sums, grads = sums_and_grads(params, batch, step_key)
    else:
      k = grad_accum_steps

      def split(x):
        # [B, ...] -> [k, B/k, ...] taking every k-th example, so the sharded
        # batch axis stays sharded and no device exchanges data.
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        i, mb = xs
        sums, grads = sums_and_grads(params, mb, jax.random.fold_in(step_key, i))
        return jax.tree.map(jnp.add, carry, (sums, grads)), None

      zeros = jax.tree.map(
        jnp.zeros_like,
        (
          {"loss_sum": 0.0, "correct_sum": 0.0, "count": 0.0},
          params,
        ),
      )
      (sums, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    tokens = sum(jnp.sum(batch[n] != 0) for n in input_names)
    return _update(tx, schedule, state, sums, grads, tokens)

  return train_step


def _update(tx, schedule, state, sums, grads, tokens):
  """The optimizer update from summed gradients, and the step's metrics."""
  params, step = state["params"], state["step"]
  count = jnp.maximum(sums["count"], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  metrics = {
    "tokens": tokens.astype(jnp.float32),  # Real (non-padding) input tokens, for tokens/s.
    "loss": sums["loss_sum"] / count,
    "accuracy": sums["correct_sum"] / count,
    "learning_rate": schedule(step),
    "grad_norm": optax.global_norm(grads),
    "param_norm": optax.global_norm(new_params),
    "update_norm": optax.global_norm(updates),
  }
  return {**state, "params": new_params, "opt_state": opt_state, "step": step + 1}, metrics


def make_recurrent_train_step(
  *,
  graphdef: nnx.GraphDef,
  rest: nnx.State,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  seed: int,
  bptt_segments: int,
) -> Callable:
  """train_step(state, batch) -> (state, metrics) for a recurrent-memory LM.

  The state carries the model's memory ({"memory": ...}) from step to step,
  so it is checkpointed with the parameters and a resumed run goes on with
  the same memory. The batch is {"inputs", "targets": [batch, length],
  "reset": [batch]}: each row continues its stream from the previous step;
  rows with reset=True start over with an empty memory. The length is
  `bptt_segments` model segments, run in order with gradients through the
  memory between them (the Transformer-XL kinds stop them anyway); the memory
  kept for the next step carries no gradient. Auxiliary losses (the
  compressive memory's attention reconstruction) are added to the loss,
  weighted per predicted token like it.
  """
  base_key = jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM)

  def train_step(state, batch):
    step_key = jax.random.fold_in(base_key, state["step"])

    def loss_fn(p):
      model = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
      nnx.reseed(model, dropout=step_key)
      logits, memory, aux = model.run(
        batch["inputs"],
        state["memory"],
        reset=batch["reset"],
        bptt_segments=bptt_segments,
        deterministic=False,
      )
      sums = lm_sums(logits, batch["targets"])
      aux_total = sum(aux.values(), jnp.zeros((), jnp.float32))
      return sums["loss_sum"] + aux_total * sums["count"], (sums, memory, aux)

    (_, (sums, memory, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_state, metrics = _update(tx, schedule, state, sums, grads, jnp.sum(batch["inputs"] != 0))
    new_state["memory"] = jax.lax.stop_gradient(memory)
    metrics.update({f"aux_{name}": value for name, value in aux.items()})
    return new_state, metrics

  return train_step


def make_recurrent_eval_step(*, graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
  """eval_step(params, memory, batch) -> (sums, memory): one segment, memory carried."""

  def eval_step(params, memory, batch):
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
    logits, memory, _ = model.run(batch["inputs"], memory, reset=batch["reset"])
    return lm_sums(logits, batch["targets"]), memory

  return eval_step


def make_eval_step(
  *, graphdef: nnx.GraphDef, rest: nnx.State, input_names: Sequence[str]
) -> Callable:
  """Returns eval_step(params, batch) -> summed loss/correct/count over the batch."""

  def eval_step(params, batch):
    logits = _apply_model(graphdef, params, rest, batch, input_names, deterministic=True)
    return classification_sums(logits, batch["targets"], batch.get("weight"))

  return eval_step
