"""Optax optimizers and LRA's learning-rate schedules, built from `config.optimizer`."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from efficient_transformers.errors import ConfigError
from efficient_transformers.mixers import SSM_PARAMETER_NAMES
from efficient_transformers.training import pruning

SCHEDULES = ("rsqrt", "cosine", "constant")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """The learning rate as a function of the (0-based) optimizer step.

  Steps count from 1 inside the formulas, as in the original LRA code, so the
  first update already has a nonzero rate. With t = step + 1 and w = warmup:
  'rsqrt': LRA's schedule, base x min(1, t/w) x rsqrt(max(t, w)); its peak is
    base / sqrt(w) (0.05 / sqrt(1000) ~ 1.6e-3 for ListOps).
  'cosine': base x min(1, t/w), then a cosine from base at t = w to 0 at
    t = num_train_steps.
  'constant': base x min(1, t/w).
  """
  if cfg.schedule not in SCHEDULES:
    raise ConfigError(
      f"config.optimizer.schedule must be one of {SCHEDULES}; got {cfg.schedule!r}."
    )
  if cfg.warmup_steps < 0:
    raise ConfigError(f"config.optimizer.warmup_steps must be >= 0; got {cfg.warmup_steps}.")
  if not cfg.learning_rate >= 0:  # 0 is a frozen run (e.g. checking init_from); < 0 ascends.
    raise ConfigError(f"config.optimizer.learning_rate must be >= 0; got {cfg.learning_rate}.")
  if cfg.schedule == "cosine" and cfg.warmup_steps > num_train_steps:
    # The run would end mid-warmup: no peak, and no step left for the cosine decay.
    raise ConfigError(
      f"config.optimizer.warmup_steps={cfg.warmup_steps} is longer than "
      f"config.num_train_steps={num_train_steps}, so the cosine schedule never decays; "
      "lower warmup_steps or raise num_train_steps."
    )
  base, w = cfg.learning_rate, max(cfg.warmup_steps, 1)
  decay_steps = max(num_train_steps - w, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32) + 1.0
    lr = base * jnp.minimum(1.0, t / w)
    if cfg.schedule == "rsqrt":
      lr = lr * jax.lax.rsqrt(jnp.maximum(t, w))
    elif cfg.schedule == "cosine":
      frac = jnp.clip((t - w) / decay_steps, 0.0, 1.0)
      lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return lr

  return schedule


def warn_about(cfg: ml_collections.ConfigDict, num_train_steps: int) -> None:
  """Logs settings that are legal but probably not meant."""
  if cfg.warmup_steps > num_train_steps:
    logging.warning(
      "config.optimizer.warmup_steps=%d outlasts config.num_train_steps=%d: the learning "
      "rate never reaches its peak.",
      cfg.warmup_steps,
      num_train_steps,
    )


def ssm_labels(params) -> dict:
  """ "ssm" for the state-space parameters (by name: `mixers.SSM_PARAMETER_NAMES`), else
  "default": the labels of `optax.multi_transform`."""

  def label(path, _):
    return "ssm" if getattr(path[-1], "key", None) in SSM_PARAMETER_NAMES else "default"

  return jax.tree_util.tree_map_with_path(label, params)


def pruning_schedule(cfg: ml_collections.ConfigDict | None, num_train_steps: int):
  """Zhu & Gupta's schedule from `config.pruning`, or None when pruning is off (sparsity 0).

  end_step = -1 ends the schedule at 3/4 of the run (rounded down to a pruning step), so the
  last quarter fine-tunes the pruned network, as Zhu & Gupta do.
  """
  if cfg is None or cfg.final_sparsity == 0.0:
    return None
  for key in ("final_sparsity", "initial_sparsity"):
    if not 0.0 <= cfg[key] < 1.0:
      raise ConfigError(f"config.pruning.{key} must be in [0, 1); got {cfg[key]}.")
  if cfg.initial_sparsity > cfg.final_sparsity:
    raise ConfigError(
      f"config.pruning.initial_sparsity={cfg.initial_sparsity} must not exceed "
      f"final_sparsity={cfg.final_sparsity}."
    )
  if cfg.scope not in pruning.SCOPES:
    raise ConfigError(
      f"config.pruning.scope={cfg.scope!r} is not one of {', '.join(pruning.SCOPES)}."
    )
  if not (isinstance(cfg.frequency, int) and cfg.frequency >= 1):
    raise ConfigError(f"config.pruning.frequency must be an integer >= 1; got {cfg.frequency!r}.")
  begin, frequency = cfg.begin_step, cfg.frequency
  end = cfg.end_step
  if end == -1:
    end = begin + max((num_train_steps * 3 // 4 - begin) // frequency, 1) * frequency
  if not 0 <= begin < end or (end - begin) % frequency:
    raise ConfigError(
      f"config.pruning needs 0 <= begin_step < end_step with end_step - begin_step a multiple "
      f"of frequency={frequency}; got begin_step={begin}, end_step={cfg.end_step}."
    )
  return pruning.cubic_sparsity(
    final_sparsity=cfg.final_sparsity,
    initial_sparsity=cfg.initial_sparsity,
    begin_step=begin,
    end_step=end,
    frequency=frequency,
  )


def make_optimizer(
  cfg: ml_collections.ConfigDict,
  num_train_steps: int,
  pruning_cfg: ml_collections.ConfigDict | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled weight decay) with optional global-norm clipping, and optional
  magnitude pruning (`config.pruning`, `pruning_schedule`) last in the chain.

  With `ssm_learning_rate` set, the state-space parameters (`ssm_labels`) are
  a second AdamW group at that peak rate (the same schedule shape) with
  `ssm_weight_decay`, through `optax.multi_transform`; clipping acts on the
  whole gradient before either. Without it the optimizer state has the one-
  group layout, so earlier checkpoints resume.
  """
  for key in ("b1", "b2"):
    if not 0.0 <= cfg[key] < 1.0:
      raise ConfigError(f"config.optimizer.{key} must be in [0, 1); got {cfg[key]}.")
  if cfg.weight_decay < 0 or cfg.eps < 0:
    raise ConfigError(
      f"config.optimizer.weight_decay and eps must be >= 0; got {cfg.weight_decay}, {cfg.eps}."
    )
  if cfg.grad_clip_norm < 0:
    raise ConfigError(f"config.optimizer.grad_clip_norm must be >= 0; got {cfg.grad_clip_norm}.")
  if cfg.grad_accum_steps < 1:
    raise ConfigError(
      f"config.optimizer.grad_accum_steps must be >= 1; got {cfg.grad_accum_steps}."
    )
  schedule = learning_rate_schedule(cfg, num_train_steps)

  def adamw(lr, weight_decay):
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay)

  chain = []
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  ssm_lr = cfg.get("ssm_learning_rate")
  if ssm_lr is None:
    chain.append(adamw(schedule, cfg.weight_decay))
  else:
    ssm_decay = cfg.get("ssm_weight_decay", 0.0)
    if not ssm_lr >= 0 or not ssm_decay >= 0:
      raise ConfigError(
        "config.optimizer.ssm_learning_rate and ssm_weight_decay must be >= 0; got "
        f"{ssm_lr}, {ssm_decay}."
      )
    scale = ssm_lr / cfg.learning_rate if cfg.learning_rate else 0.0
    ssm_schedule = (lambda step: scale * schedule(step)) if cfg.learning_rate else ssm_lr
    groups = {"default": adamw(schedule, cfg.weight_decay), "ssm": adamw(ssm_schedule, ssm_decay)}
    chain.append(optax.multi_transform(groups, ssm_labels))
  sparsity = pruning_schedule(pruning_cfg, num_train_steps)
  if sparsity is not None:  # Last: it rewrites the updates so that pruned weights stay 0.
    chain.append(pruning.magnitude_pruning(sparsity, scope=pruning_cfg.scope))
  return optax.chain(*chain), schedule
