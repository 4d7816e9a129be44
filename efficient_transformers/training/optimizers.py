"""Optax optimizers and LRA's learning-rate schedules, built from `config.optimizer`."""

import jax.numpy as jnp
import ml_collections
import optax

from efficient_transformers.errors import ConfigError

SCHEDULES = ("rsqrt", "cosine", "constant")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """The learning rate as a function of the (0-based) optimizer step.

  'rsqrt': LRA's text-task schedule, base x min(1, t/warmup) x rsqrt(max(t, warmup)),
    peaking at base / sqrt(warmup) (0.05 / sqrt(1000) ~ 1.6e-3 for ListOps).
  'cosine': linear warmup to base, then cosine decay to 0 at num_train_steps.
  'constant': linear warmup to base, then flat.
  """
  base, warmup = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == "rsqrt":

    def rsqrt(step):
      t = jnp.asarray(step, jnp.float32) + 1.0  # The original counted steps from 1.
      w = max(warmup, 1)
      return base * jnp.minimum(1.0, t / w) * jnp.reciprocal(jnp.sqrt(jnp.maximum(t, w)))

    return rsqrt
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=base,
      warmup_steps=warmup,
      decay_steps=max(num_train_steps, warmup + 1),
      end_value=0.0,
    )
  if cfg.schedule == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, base, max(warmup, 1)), optax.constant_schedule(base)],
      [max(warmup, 1)],
    )
  raise ConfigError(f"config.optimizer.schedule must be one of {SCHEDULES}; got {cfg.schedule!r}.")


def make_optimizer(
  cfg: ml_collections.ConfigDict, num_train_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled weight decay) with optional global-norm clipping."""
  if cfg.grad_clip_norm < 0:
    raise ConfigError(f"config.optimizer.grad_clip_norm must be >= 0; got {cfg.grad_clip_norm}.")
  if cfg.grad_accum_steps < 1:
    raise ConfigError(
      f"config.optimizer.grad_accum_steps must be >= 1; got {cfg.grad_accum_steps}."
    )
  schedule = learning_rate_schedule(cfg, num_train_steps)
  chain = []
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(
    optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  )
  return optax.chain(*chain), schedule
