"""Magnitude pruning as an optax transformation, with Zhu & Gupta's gradual schedule.

    tx = optax.chain(optax.adamw(1e-3), pruning.magnitude_pruning(
        pruning.cubic_sparsity(final_sparsity=0.9, begin_step=100, end_step=1_000)))

Zhu & Gupta, "To prune, or not to prune" (2017), eq. 1: the sparsity at step t rises from
s_i to s_f over n pruning steps spaced dt apart, starting at t0,

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,

fast at first, when redundant weights are many, slower near the end. At every pruning step
(t0, t0 + dt, ...) the mask is recomputed: the smallest-magnitude weights are zeroed, the
fraction s_t of them either over all prunable weights together (`scope="global"`) or in
each weight array alone (`scope="per_layer"`). Between pruning steps and after the last
one the mask is held, so a pruned weight stays exactly zero whatever later updates say.

The transformation goes last in the chain: it rewrites the updates so that params +
updates is the masked result (it needs `params` in `update`). Which leaves are pruned:
by default every array with at least 2 dimensions (kernels and embeddings; not biases,
norms' scales or SSM parameters of one dimension); `prunable(path, leaf) -> bool` chooses
otherwise. The mask is part of the optimizer state, so it is checkpointed with it.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from efficient_transformers.errors import ConfigError

SCOPES = ("global", "per_layer")


def cubic_sparsity(
  *,
  final_sparsity: float,
  begin_step: int,
  end_step: int,
  initial_sparsity: float = 0.0,
  frequency: int = 1,
) -> Callable[[jax.Array], jax.Array]:
  """Zhu & Gupta's schedule: step -> target sparsity, held between pruning steps.

  Args:
    final_sparsity: s_f in [0, 1).
    begin_step: t0, the first pruning step.
    end_step: t0 + n dt, the last (the sparsity is s_f from there on).
    initial_sparsity: s_i in [0, s_f].
    frequency: dt, steps between pruning steps; (end_step - begin_step) must be a multiple.
  """
  if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
    raise ConfigError(
      f"pruning needs 0 <= initial_sparsity <= final_sparsity < 1; got initial_sparsity="
      f"{initial_sparsity!r}, final_sparsity={final_sparsity!r}.",
      argument="final_sparsity",
    )
  if not (isinstance(frequency, int) and frequency >= 1):
    raise ConfigError(f"pruning frequency={frequency!r} must be an integer >= 1.")
  if not 0 <= begin_step < end_step or (end_step - begin_step) % frequency:
    raise ConfigError(
      f"pruning needs 0 <= begin_step < end_step with end_step - begin_step a multiple of "
      f"frequency={frequency}; got begin_step={begin_step!r}, end_step={end_step!r}.",
      argument="end_step",
    )
  span = end_step - begin_step

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    # The last pruning step at or before `step`: the sparsity is held in between.
    held = begin_step + (jnp.clip(step, begin_step, end_step) - begin_step) // frequency * frequency
    progress = (held - begin_step).astype(jnp.float32) / span
    s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3
    return jnp.where(step < begin_step, 0.0, s)

  schedule.begin_step, schedule.end_step, schedule.frequency = begin_step, end_step, frequency
  return schedule


def default_prunable(path, leaf) -> bool:
  """Kernels and embeddings: arrays of 2 or more dimensions."""
  del path
  return jnp.ndim(leaf) >= 2


class PruningState(NamedTuple):
  count: jax.Array  # The step about to be taken.
  masks: optax.Params  # bool, like params; True = kept (all True for unprunable leaves).


def _keep_largest(magnitudes: jax.Array, sparsity: jax.Array) -> jax.Array:
  """bool mask keeping all but the floor(sparsity * n) smallest entries (ties by position)."""
  flat = magnitudes.reshape(-1)
  pruned = jnp.floor(sparsity * flat.size).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
  return (rank >= pruned).reshape(magnitudes.shape)


def magnitude_pruning(
  schedule: Callable[[jax.Array], jax.Array],
  *,
  scope: str = "global",
  prunable: Callable = default_prunable,
) -> optax.GradientTransformation:
  """An optax transformation pruning the smallest weights to `schedule(step)` sparsity.

  Args:
    schedule: step -> sparsity, e.g. `cubic_sparsity(...)`; the mask is recomputed at the
      schedule's pruning steps (begin_step, begin_step + frequency, ..., end_step), held
      otherwise.
    scope: "global" (one threshold over every prunable weight) or "per_layer" (each array
      its own).
    prunable: (path, leaf) -> whether the leaf is pruned.
  """
  if scope not in SCOPES:
    raise ConfigError(f"pruning scope={scope!r} is not one of {', '.join(SCOPES)}.")
  begin = getattr(schedule, "begin_step", 0)
  end = getattr(schedule, "end_step", None)
  frequency = getattr(schedule, "frequency", 1)

  def init(params):
    masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    return PruningState(count=jnp.zeros((), jnp.int32), masks=masks)

  def new_masks(candidates, sparsity):
    flags = jax.tree_util.tree_map_with_path(lambda path, p: prunable(path, p), candidates)
    leaves, treedef = jax.tree.flatten(candidates)
    chosen = jax.tree.leaves(flags)
    if scope == "per_layer":
      masks = [
        _keep_largest(jnp.abs(p), sparsity) if keep else jnp.ones(p.shape, bool)
        for p, keep in zip(leaves, chosen, strict=True)
      ]
    else:
      pruned = [p for p, keep in zip(leaves, chosen, strict=True) if keep]
      if pruned:
        joint = _keep_largest(jnp.concatenate([jnp.abs(p).reshape(-1) for p in pruned]), sparsity)
      masks, offset = [], 0
      for p, keep in zip(leaves, chosen, strict=True):
        if keep:
          masks.append(joint[offset : offset + p.size].reshape(p.shape))
          offset += p.size
        else:
          masks.append(jnp.ones(p.shape, bool))
    return jax.tree.unflatten(treedef, masks)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("magnitude_pruning needs params: optimizer.update(grads, state, params).")
    step = state.count
    candidates = jax.tree.map(lambda p, u: p + u, params, updates)
    is_pruning_step = (step >= begin) & ((step - begin) % frequency == 0)
    if end is not None:
      is_pruning_step &= step <= end
    masks = jax.lax.cond(
      is_pruning_step,
      lambda: new_masks(candidates, schedule(step)),
      lambda: state.masks,
    )
    # params + new updates = the masked candidates: pruned weights land on exactly zero.
    new_updates = jax.tree.map(
      lambda c, p, m: jnp.where(m, c, jnp.zeros((), c.dtype)) - p, candidates, params, masks
    )
    return new_updates, PruningState(count=step + 1, masks=masks)

  return optax.GradientTransformation(init, update)


def sparsity_stats(params, prunable: Callable = default_prunable) -> dict[str, float]:
  """{"sparsity": zero fraction of the prunable weights, "remaining_params": nonzero
  parameters of the whole tree, "num_params": all of them}, for logging."""
  flags = jax.tree_util.tree_map_with_path(lambda path, p: prunable(path, p), params)
  leaves, chosen = jax.tree.leaves(params), jax.tree.leaves(flags)
  prunable_total = sum(p.size for p, keep in zip(leaves, chosen, strict=True) if keep)
  prunable_zero = sum(int((p == 0).sum()) for p, keep in zip(leaves, chosen, strict=True) if keep)
  return {
    "sparsity": prunable_zero / max(prunable_total, 1),
    "remaining_params": float(sum(int((p != 0).sum()) for p in leaves)),
    "num_params": float(sum(p.size for p in leaves)),
  }


def sparsity_metrics(params, prunable: Callable = default_prunable) -> dict[str, jax.Array]:
  """`sparsity_stats`' "sparsity" and "remaining_params" as traced values: the train
  step's metrics under pruning."""
  flags = jax.tree_util.tree_map_with_path(lambda path, p: prunable(path, p), params)
  leaves, chosen = jax.tree.leaves(params), jax.tree.leaves(flags)
  pruned = [p for p, keep in zip(leaves, chosen, strict=True) if keep]
  total = sum(p.size for p in pruned)
  zeros = sum(jnp.sum(p == 0) for p in pruned) if pruned else jnp.zeros((), jnp.int32)
  remaining = sum(jnp.sum(p != 0) for p in leaves)
  return {
    "sparsity": zeros.astype(jnp.float32) / max(total, 1),
    "remaining_params": remaining.astype(jnp.float32),
  }
