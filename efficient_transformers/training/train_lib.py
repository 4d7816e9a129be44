"""`train_and_evaluate(config, workdir)`: the one training loop, read top to bottom.

Resume order: a checkpoint in `workdir` -> `config.init_from` (parameters
only) -> scratch. The same function runs on one CPU, one GPU, or every process
of a multi-host pod (after `distributed.initialize`).
"""

import json
import math
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from efficient_transformers.data import pipeline, tasks
from efficient_transformers.errors import CheckpointError, ConfigError, UserError
from efficient_transformers.training import checkpointing, sharding, state
from efficient_transformers.training.evaluation import (
  evaluate,
  evaluate_stream,
  model_fingerprint,
)
from efficient_transformers.training.metrics import MetricWriter

# config.data keys that change how data is read, not which batches are made.
_READ_ONLY_DATA_KEYS = ("num_workers", "cache")


class NonFiniteLossError(UserError, RuntimeError):
  """The training loss became NaN or Inf (a hyperparameter or data problem)."""


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint, then stopping.", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step: int, *, collective: bool) -> bool:
    """Whether to save and stop after `step`; the same answer on every process.

    Multi-process: JAX's preemption service (fed by SIGTERM on TPU VMs) agrees
    on a step by itself and is asked every step; our own signal flag needs a
    collective to agree, made only when `collective` (at log steps).
    """
    if jax.process_count() == 1:
      return self.requested
    if multihost_utils.reached_preemption_sync_point(step):
      return True
    if collective:
      return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))
    return False


def _check_config(config: ml_collections.ConfigDict) -> None:
  """Settings that would otherwise fail deep inside JAX, as messages naming the key."""
  for key in ("num_train_steps", "batch_size", "log_every_steps", "eval_every_steps"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key} must be positive; got {config[key]}.")
  if config.checkpoint_every_steps < 0:
    raise ConfigError(
      f"config.checkpoint_every_steps must be >= 0; got {config.checkpoint_every_steps}."
    )
  accum = config.optimizer.grad_accum_steps
  if accum < 1:
    raise ConfigError(f"config.optimizer.grad_accum_steps must be >= 1; got {accum}.")
  if config.batch_size % jax.process_count():
    raise ConfigError(
      f"config.batch_size={config.batch_size} must divide evenly over "
      f"{jax.process_count()} processes."
    )
  if config.batch_size % accum:
    raise ConfigError(
      f"config.batch_size={config.batch_size} must be divisible by "
      f"config.optimizer.grad_accum_steps={accum}."
    )


def _check_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """The batch and the sharded model axes must divide over the mesh."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.batch_size // config.optimizer.grad_accum_steps
  if micro % shards:
    raise ConfigError(
      f"Each (micro-)batch of {micro} examples (config.batch_size / "
      f"config.optimizer.grad_accum_steps) must split over mesh.data x mesh.fsdp = {shards} "
      "devices; change config.batch_size or config.mesh."
    )
  for key, axis in (("num_heads", "tensor"), ("mlp_dim", "tensor"), ("emb_dim", "fsdp")):
    if config.model[key] % mesh.shape[axis]:
      raise ConfigError(
        f"config.model.{key}={config.model[key]} must be divisible by "
        f"config.mesh.{axis}={mesh.shape[axis]}."
      )


def stream_lengths(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(train, eval) tokens per row and step of a stream task: the train step runs
  config.model.bptt_segments segments of config.model.segment_length, evaluation one."""
  segment = config.model.get("segment_length") or 0
  return segment * int(config.model.get("bptt_segments") or 1), segment


def eval_memory_lengths(config: ml_collections.ConfigDict) -> dict:
  """Memory sizes for evaluation: config.model.eval_mem_len (> 0) overrides mem_len."""
  eval_mem_len = config.model.get("eval_mem_len", 0)
  return {"mem_len": eval_mem_len} if eval_mem_len and eval_mem_len > 0 else {}


def batch_fields(task: tasks.TaskData, rows: int, length: int) -> dict[str, np.ndarray]:
  """Example arrays shaped like a task's batch rows (for the abstract batch)."""
  if not task.stream:
    return task.splits["train"]
  return {
    "inputs": np.zeros((rows, length), np.int32),
    "targets": np.zeros((rows, length), np.int32),
    "reset": np.zeros((rows,), bool),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`; returns the final validation metrics."""
  # Signals are caught from the start: one arriving during data generation or
  # compilation stops the run at its first step, after a save.
  with _Preemption() as preemption:
    return _train(config, workdir, preemption)


def _train(config: ml_collections.ConfigDict, workdir: str, preemption: _Preemption) -> dict:
  _check_config(config)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  # ---------------------------------------------------------------- Input.
  # Process 0 makes missing data first so processes sharing a filesystem never
  # generate the same files at once; on separate disks each then makes its own.
  if process_index == 0:
    task = tasks.load(config)
  if process_count > 1:
    multihost_utils.sync_global_devices("data ready")
  if process_index != 0:
    task = tasks.load(config)
  train_length, eval_length = stream_lengths(config)
  train_iter = pipeline.task_train_iterator(
    task,
    global_batch_size=config.batch_size,
    seed=config.seed,
    sequence_length=train_length,
    process_index=process_index,
    process_count=process_count,
  )

  task.splits["validation"]  # Read now: a bad file should fail before training, not at step N.

  def validation_batches():
    return pipeline.task_eval_batches(
      task,
      "validation",
      global_batch_size=config.batch_size,
      sequence_length=eval_length,
      process_index=process_index,
      process_count=process_count,
    )

  # ---------------------------------------------------------------- Mesh, model, shardings.
  state.check_model_fits_task(config.model, config.task, task.stream)
  setup = state.make_setup(config, vocab_size=task.vocab_size, num_classes=task.num_classes)
  _check_layout(config, setup.mesh)
  fields = set(batch_fields(task, 1, train_length))
  if not set(setup.input_names) <= fields:
    raise ConfigError(
      f"config.model.kind={config.model.kind!r} reads {list(setup.input_names)}, but task "
      f"{config.task!r} provides {sorted(fields)}."
    )
  logging.info(
    "Mesh %s over %d devices (%s); model %s with %s attention, %d parameters.",
    dict(setup.mesh.shape),
    jax.device_count(),
    jax.devices()[0].device_kind,
    config.model.kind,
    config.model.get("attention") or f"{config.model.get('memory')} memory",
    setup.num_params,
  )

  # ---------------------------------------------------------------- Update step (compiled AOT).
  batch_spec = setup.batch_spec(batch_fields(task, 1, train_length), config.batch_size)
  compiled_train_step = setup.compile_train_step(
    batch_spec, seed=config.seed, grad_accum_steps=config.optimizer.grad_accum_steps
  )
  if task.stream:
    eval_spec = setup.batch_spec(batch_fields(task, 1, eval_length), config.batch_size)
    eval_memory = eval_memory_lengths(config)
    eval_step = setup.compile_eval_step(
      eval_spec, memory=setup.init_memory.abstract(config.batch_size, **eval_memory)
    )
  else:
    eval_step = setup.compile_eval_step(batch_spec)
  memory = compiled_train_step.memory_analysis()
  if memory is not None:
    logging.info(
      "Compiled train step: %.1f MiB temporaries, %.1f MiB arguments per device.",
      memory.temp_size_in_bytes / 2**20,
      memory.argument_size_in_bytes / 2**20,
    )

  # ---------------------------------------------------------------- Checkpoint: resume or start.
  fingerprint = model_fingerprint(config, task)
  ckpt = checkpointing.Checkpointer(
    workdir,
    max_to_keep=config.max_checkpoints_to_keep,
    fingerprint=fingerprint,
    best_metric=task.best_metric,
    best_mode=task.best_mode,
  )
  # What fixes the sequence of training batches; a resume must not change it.
  data_order = {
    "seed": config.seed,
    "batch_size": config.batch_size,
    "process_count": process_count,
    # How the data is read (workers, caching) does not change the batches.
    "data": {k: v for k, v in config.data.to_dict().items() if k not in _READ_ONLY_DATA_KEYS},
  }
  if ckpt.latest_step() is not None:
    step, train_state, data_state = ckpt.restore(setup.abstract_state, which="latest")
    if data_state is not None:
      if data_state.get("order") != data_order:
        raise CheckpointError(
          f"The checkpoint in {workdir} was trained with data order {data_state.get('order')}; "
          f"this run has {data_order}. Resuming would feed different batches: use the same "
          "seed, batch size, data settings and process count, or a fresh --workdir."
        )
      train_iter.set_state(data_state["train_iterator"])
    logging.info("Resumed from %s at step %d.", workdir, step)
  elif config.init_from:
    # Parameters only: the source's optimizer, data position and process count
    # do not matter, and its attention may differ if the parameters line up.
    source = checkpointing.Checkpointer(config.init_from)
    if source.latest_step() is None and source.best_step() is None:
      raise CheckpointError(f"config.init_from={config.init_from!r} holds no checkpoint.")
    which = "best" if source.best_step() is not None else "latest"
    _, params = source.restore_params(
      setup.abstract_state["params"], which=which, check_fingerprint=False
    )
    source.close()
    train_state = state.init_state(setup, params=params)
    logging.info("Initialized parameters from %s (%s).", config.init_from, which)
  else:
    train_state = state.init_state(setup)
  step = int(jax.device_get(train_state["step"]))

  # ---------------------------------------------------------------- Loop.
  writer = MetricWriter(
    workdir, enabled=is_main, total_steps=config.num_train_steps, initial_step=step
  )

  pending: list[tuple[int, dict]] = []  # Per-step metrics still on device.
  last_eval: dict = {}
  last_eval_step = None
  t_log, step_log, paused = time.perf_counter(), step, 0.0

  def check_finite():
    """Raises if any pending step's loss is NaN/Inf, naming the first such step."""
    losses = jax.device_get([m["loss"] for _, m in pending])
    for (at, _), loss in zip(pending, losses, strict=True):
      if not math.isfinite(float(loss)):
        raise NonFiniteLossError(
          f"Training loss is {float(loss)} at step {at}; stopping. Lower "
          "config.optimizer.learning_rate, set config.optimizer.grad_clip_norm, or check the data."
        )

  def flush_train_metrics():
    nonlocal t_log, step_log, paused
    if not pending:
      return
    check_finite()
    host = jax.device_get(pending)
    pending.clear()
    elapsed = time.perf_counter() - t_log - paused  # Evaluation and saving excluded.
    done = host[-1][0] - step_log
    means = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1] if k != "tokens"}
    tokens = float(np.sum([m["tokens"] for _, m in host]))
    if done > 0 and elapsed > 0:
      means["steps_per_sec"] = done / elapsed
      means["examples_per_sec"] = done * config.batch_size / elapsed
      means["tokens_per_sec"] = tokens / elapsed  # Real tokens, padding not counted.
    writer.write(host[-1][0], "train", means)
    t_log, step_log, paused = time.perf_counter(), host[-1][0], 0.0

  def save(at_step: int, metrics: dict | None = None):
    check_finite()  # Never checkpoint parameters that went NaN.
    ckpt.save(
      at_step,
      train_state,
      data_state={"train_iterator": train_iter.get_state(), "order": data_order},
      metrics=metrics,
    )

  while step < config.num_train_steps:
    batch = sharding.global_batch(next(train_iter), setup.batch_sharding)
    with jax.transfer_guard("disallow"):
      train_state, metrics = compiled_train_step(train_state, batch)
    step += 1
    pending.append((step, metrics))
    writer.advance(step)

    if step % config.log_every_steps == 0:
      flush_train_metrics()
    is_last = step == config.num_train_steps
    t_pause = time.perf_counter()
    if step % config.eval_every_steps == 0 or is_last:
      if task.stream:
        last_eval = evaluate_stream(
          eval_step,
          train_state["params"],
          setup.init_memory(config.batch_size, **eval_memory),
          validation_batches(),
          setup.batch_sharding,
          max_batches=config.num_eval_batches,
        )
      else:
        last_eval = evaluate(
          eval_step,
          train_state["params"],
          validation_batches(),
          setup.batch_sharding,
          max_batches=config.num_eval_batches,
        )
      last_eval_step = step
      writer.write(step, "validation", last_eval)
      save(step, metrics=last_eval)  # Every evaluation may be the best.
    elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
      save(step)
    paused += time.perf_counter() - t_pause
    at_log = step % config.log_every_steps == 0
    if not is_last and preemption.should_stop(step, collective=at_log):
      flush_train_metrics()
      save(step)
      logging.warning("Stopped at step %d after a preemption signal; rerun to resume.", step)
      break
  flush_train_metrics()
  writer.close()
  ckpt.close()
  if is_main and last_eval:
    with open(os.path.join(workdir, "validation.json"), "w") as f:
      json.dump(
        {"step": last_eval_step, **{k: float(v) for k, v in last_eval.items()}}, f, indent=2
      )
  return last_eval
