"""The one jitted train step and the one eval step, pure functions of a state pytree.

The train state is a plain pytree, the unit of sharding, donation and
checkpointing:
  {"params": nested dict of arrays, "opt_state": optax state, "step": int32,
   "carry": the objective's carry (a language model's memory), if it has one}
The model's graph definition and its non-parameter state (dropout RNG streams)
are closed over; dropout keys are re-derived from (seed, step) every step, so
a resumed run draws exactly the masks an uninterrupted one would. What the
model is scored on comes from the task's objective (`objectives.py`): the
steps never ask which task they run.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

_DROPOUT_STREAM = 0x64726F70  # "drop"
_OBJECTIVE_STREAM = 0x6F626A  # "obj": an objective's own draws (which tokens to mask).


def _objective_key(objective, key) -> dict:
  """{"key": ...} for an objective that draws (`needs_key`), else {}."""
  if not getattr(objective, "needs_key", False):
    return {}
  return {"key": jax.random.fold_in(key, _OBJECTIVE_STREAM)}


def _merge(graphdef, params, rest, dropout_key=None):
  # Fresh Variables for this trace: the closed-over `rest` was made outside it,
  # and reseeding must not mutate state owned by another trace level.
  model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
  if dropout_key is not None:
    nnx.reseed(model, dropout=dropout_key)
  return model


def make_train_step(
  *,
  graphdef: nnx.GraphDef,
  rest: nnx.State,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  objective,
  seed: int,
  grad_accum_steps: int = 1,
  param_metrics: Callable[[dict], dict] | None = None,
  teacher: tuple[nnx.GraphDef, nnx.State] | None = None,
) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics); jit it with the state donated.

  `param_metrics(new params)` adds metrics (pruning's sparsity). With a `teacher`
  (graphdef, rest) the step is train_step(state, batch, teacher_params): the teacher is
  merged from those parameters (under stop_gradient, never updated), run deterministically
  and handed to the objective (`distill.DistillationObjective`) as `teacher=`.

  The objective scores the batch (`objectives.py`); its carry, if any, is read
  from state["carry"] and the new one (without gradient) written back.
  Auxiliary losses are added to the loss, weighted like one counted unit.

  With grad_accum_steps = k the global batch is split into k micro-batches run
  one after another (lax.scan) and their gradients summed, so one step still
  makes one optimizer update over the whole batch, with about 1/k the
  activation memory. An objective with a carry needs k = 1 (its rows follow
  the batch rows from step to step); `state.TrainSetup` refuses the rest.
  """
  # Its own stream: parameter init draws from jax.random.key(seed) itself.
  base_key = jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM)

  def sums_and_grads(params, batch, carry, dropout_key, teacher_params=None):
    extra = _objective_key(objective, dropout_key)
    if teacher is not None:
      teacher_graphdef, teacher_rest = teacher
      extra["teacher"] = _merge(
        teacher_graphdef, jax.lax.stop_gradient(teacher_params), teacher_rest
      )

    def loss_fn(p):
      model = _merge(graphdef, p, rest, dropout_key)
      sums, new_carry, aux = objective.apply(model, batch, carry, deterministic=False, **extra)
      loss = sums["loss_sum"]
      if aux:  # Static: an objective without auxiliary losses keeps the plain graph.
        loss = loss + sum(aux.values()) * sums["count"]
      return loss, (sums, new_carry, aux)

    (_, (sums, new_carry, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return sums, grads, new_carry, aux

  def train_step(state, batch, teacher_params=None):
    params = state["params"]
    step_key = jax.random.fold_in(base_key, state["step"])
    carry = state.get("carry")
    if grad_accum_steps == 1:
      sums, grads, carry, aux = sums_and_grads(params, batch, carry, step_key, teacher_params)
    else:
      k = grad_accum_steps

      def split(x):
        # [B, ...] -> [k, B/k, ...] taking every k-th example, so the sharded
        # batch axis stays sharded and no device exchanges data.
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      micro = jax.tree.map(split, batch)
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(
        lambda: sums_and_grads(params, first, carry, step_key, teacher_params)[::3]  # sums, aux
      )

      def body(total, xs):
        i, mb = xs
        key = jax.random.fold_in(step_key, i)
        sums, grads, _, aux = sums_and_grads(params, mb, carry, key, teacher_params)
        return jax.tree.map(jnp.add, total, (sums, grads, aux)), None

      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0], params, shapes[1]))
      (sums, grads, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
      aux = jax.tree.map(lambda a: a / k, aux)  # Means per micro-batch -> their mean.
    tokens = sum(jnp.sum(batch[n] != 0) for n in objective.input_names)
    new_state, metrics = _update(tx, schedule, state, sums, grads, tokens)
    if carry is not None:
      new_state["carry"] = jax.lax.stop_gradient(carry)
    metrics.update({f"aux_{name}": value for name, value in aux.items()})
    if param_metrics is not None:
      metrics.update(param_metrics(new_state["params"]))
    return new_state, metrics

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
  # An objective's further sums (distillation's "ce_sum", "kl_sum"), per counted unit.
  for key in sorted(sums):
    if key.endswith("_sum") and key not in ("loss_sum", "correct_sum"):
      metrics[key.removesuffix("_sum")] = sums[key] / count
  return {**state, "params": new_params, "opt_state": opt_state, "step": step + 1}, metrics


def make_eval_step(*, graphdef: nnx.GraphDef, rest: nnx.State, objective) -> Callable:
  """Returns eval_step(params, carry, batch) -> (sums, carry): one batch, the carry passed on.

  Classifiers carry None through; a language model its memory, from one
  segment of the ordered evaluation stream to the next.
  """

  # One fixed key: every evaluation of an objective that draws scores the same draws.
  extra = _objective_key(objective, jax.random.key(0))

  def eval_step(params, carry, batch):
    model = _merge(graphdef, params, rest)
    sums, carry, _ = objective.apply(model, batch, carry, deterministic=True, **extra)
    return sums, carry

  return eval_step
