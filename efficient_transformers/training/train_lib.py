"""`train_and_evaluate(config, workdir)`: the one training loop, read top to bottom.

Resume order: a checkpoint in `workdir` -> `config.init_from` (parameters
only) -> scratch. The same function runs on one CPU, one GPU, or every process
of a multi-host pod (after `distributed.initialize`).

The workdir is checked and locked before anything is computed (one writer per
workdir, see `workdir.py`); `dry_run(config)` builds and compiles the step for
the config's real shapes without touching data or a workdir.
"""

import json
import math
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from efficient_transformers import paths
from efficient_transformers.data import pipeline, tasks
from efficient_transformers.errors import CheckpointError, ConfigError, UserError
from efficient_transformers.training import (
  checkpointing,
  distill,
  initialization,
  optimizers,
  quantization,
  sharding,
  spt,
  state,
)
from efficient_transformers.training import workdir as workdir_lib
from efficient_transformers.training.evaluation import evaluate, model_fingerprint
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
  """Settings that would fail deep inside JAX, or train to nonsense, as messages naming the key."""
  for key in ("num_train_steps", "batch_size", "log_every_steps", "eval_every_steps"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key} must be positive; got {config[key]}.")
  for key in sorted(config.model.keys()):
    if key.endswith("dropout_rate") and not 0.0 <= config.model[key] < 1.0:
      raise ConfigError(f"config.model.{key} must be in [0, 1); got {config.model[key]}.")
  # Raise on bad values.
  optimizers.make_optimizer(config.optimizer, config.num_train_steps, config.get("pruning"))
  distill.check_config(config)
  spt.check_config(config)
  quantization.check_mode(
    config.model.get("quantization", "none"), what="config.model.quantization"
  )
  if (config.get("init_layers") or "").strip() and not config.init_from:
    raise ConfigError(
      f"config.init_layers={config.init_layers!r} chooses layers of config.init_from, which "
      "is empty: set config.init_from to the trained workdir."
    )
  optimizers.warn_about(config.optimizer, config.num_train_steps)
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
  for heads in config.model.get("heads_per_layer") or ():  # Head-pruned layers shard alike.
    if heads % mesh.shape["tensor"]:
      raise ConfigError(
        f"config.model.heads_per_layer={tuple(config.model.heads_per_layer)} must be "
        f"divisible by config.mesh.tensor={mesh.shape['tensor']} in every layer."
      )
  for key, axis in (("num_heads", "tensor"), ("mlp_dim", "tensor"), ("emb_dim", "fsdp")):
    if config.model[key] % mesh.shape[axis]:
      raise ConfigError(
        f"config.model.{key}={config.model[key]} must be divisible by "
        f"config.mesh.{axis}={mesh.shape[axis]}."
      )


def _build(config: ml_collections.ConfigDict, spec: tasks.TaskSpec):
  """The setup of a run (mesh, model, objective, shardings), from the config and the task."""
  setup = state.make_setup(config, spec)
  _check_layout(config, setup.mesh)
  return setup


def _compile_train_step(
  config: ml_collections.ConfigDict, spec: tasks.TaskSpec, setup, teacher=None
):
  batch_spec = setup.abstract_batch(spec.fields, config.batch_size)
  return setup.compile_train_step(
    batch_spec,
    seed=config.seed,
    grad_accum_steps=config.optimizer.grad_accum_steps,
    teacher=teacher,
  )


def _compile(
  config: ml_collections.ConfigDict, spec: tasks.TaskSpec, setup: state.TrainSetup, teacher=None
):
  """(compiled train step, compiled eval step) for the config's shapes."""
  eval_step = setup.compile_eval_step(setup.abstract_batch(spec.eval_fields, config.batch_size))
  return _compile_train_step(config, spec, setup, teacher), eval_step


def _cost(compiled) -> dict:
  """FLOPs and bytes per step and device from XLA's cost analysis (empty if it has none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports one.
    return {}
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per device program.
    cost = cost[0] if cost else {}
  return {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in (cost or {})}


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Compiles the train step for the config's real shapes; reads no data, writes nothing.

  What a user runs before booking a pod: the config is checked, the model is
  built abstractly (shapes from the config and the task's declared vocabulary
  and lengths), and the train step is compiled ahead of time on this run's
  devices. Returns (and the command line prints) the parameter
  count, per-device memory and FLOPs per step. With config.spt on, both stages compile:
  the fine-tuning's report, with the pretraining's under "pretrain".
  """
  _check_config(config)
  if spt.enabled(config):
    from etils import epath

    stages = spt.stage_configs(config, epath.Path("WORKDIR"))  # Not read by a dry run.
    return {**dry_run(stages["finetune"]), "pretrain": dry_run(stages["pretrain"])}
  spec = tasks.describe(config)
  setup = _build(config, spec)
  teacher = None
  if distill.enabled(config):  # Its shapes only: the dry run reads no arrays.
    teacher = distill.load_teacher(config, spec, setup, restore=False)
  t0 = time.perf_counter()
  train_step = _compile_train_step(config, spec, setup, teacher)
  compile_s = time.perf_counter() - t0
  mib = lambda b: b / 2**20
  report = {
    "task": config.task,
    "model": config.model.kind,
    "attention": config.model.get("attention") or f"{config.model.get('memory')} memory",
    "num_params": setup.num_params,
    **({"teacher_num_params": teacher.num_params} if teacher is not None else {}),
    "mesh": dict(setup.mesh.shape),
    "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    "global_batch": config.batch_size,
    "compile_s": compile_s,
  }
  memory = train_step.memory_analysis()
  if memory is not None:
    report.update(
      argument_mib=mib(memory.argument_size_in_bytes),
      temp_mib=mib(memory.temp_size_in_bytes),
      output_mib=mib(memory.output_size_in_bytes),
      alias_mib=mib(memory.alias_size_in_bytes),
    )
    # Donated state aliases its output: count it once.
    report["total_mib"] = (
      report["argument_mib"] + report["temp_mib"] + report["output_mib"] - report["alias_mib"]
    )
  cost = _cost(train_step)
  if "flops" in cost:
    report["flops_per_device"] = cost["flops"]
    report["flops"] = cost["flops"] * jax.device_count()
  return report


def format_dry_run(report: dict) -> str:
  """The dry run's report as the lines `train.py --dry_run` prints."""
  if "pretrain" in report:  # Self-pretraining first: both stages' lines.
    first = format_dry_run(report["pretrain"]).splitlines()[:-1]
    rest = {k: v for k, v in report.items() if k != "pretrain"}
    return "\n".join(["Stage 1, self-pretraining:", *first, "Stage 2, fine-tuning:"]) + (
      "\n" + format_dry_run(rest)
    )
  lines = [
    f"Dry run: {report['task']} / {report['model']} with {report['attention']}, "
    f"{report['num_params']:,} parameters; mesh {report['mesh']} over {report['devices']}; "
    f"global batch {report['global_batch']}; compiled in {report['compile_s']:.1f} s.",
  ]
  if "total_mib" in report:
    lines.append(
      "Train step memory per device: {argument_mib:.1f} MiB arguments, {temp_mib:.1f} MiB "
      "temporaries, {output_mib:.1f} MiB outputs ({alias_mib:.1f} MiB of them aliased to "
      "donated arguments): {total_mib:.1f} MiB in all.".format(**report)
    )
  if "flops" in report:
    lines.append(
      f"FLOPs per train step: {report['flops']:.4g} ({report['flops_per_device']:.4g} per "
      "device, XLA's cost analysis)."
    )
  lines.append("The step compiles for these devices; nothing was read, trained or written.")
  return "\n".join(lines)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir, *, stage: str | None = None
) -> dict:
  """Trains `config` in `workdir`; returns the final validation metrics.

  With config.spt on, two runs: self-pretraining in WORKDIR/pretrain, then fine-tuning in
  WORKDIR/finetune (`spt.py`); the fine-tuning's metrics are returned.

  Args:
    config: the run's config.
    workdir: where checkpoints and metrics go: a local path as the user wrote
      it (relative, `~`, ...) or a gs:// URL. Held by this run alone.
    stage: recorded in every metrics.jsonl record (an SPT run's "pretrain" or "finetune").
  """
  if spt.enabled(config):
    _check_config(config)
    return spt.train_stages(config, workdir, train_and_evaluate)
  # Signals are caught from the start: one arriving during data generation or
  # compilation stops the run at its first step, after a save.
  with _Preemption() as preemption:
    _check_config(config)
    spec = tasks.describe(config)  # A config error surfaces before any data is made.
    process_index, process_count = jax.process_index(), jax.process_count()
    workdir = workdir_lib.prepare(workdir)
    with paths.writing(workdir):  # The lock records its holder: a full disk says so.
      lock = workdir_lib.acquire_for_run(
        workdir, process_index=process_index, process_count=process_count
      )
    try:
      return _train(config, spec, workdir, lock, preemption, stage)
    finally:
      lock.release()


def _train(config, spec, workdir, lock, preemption: _Preemption, stage: str | None) -> dict:
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  checkpoints = {"last": None}  # The newest complete checkpoint, for messages.

  def resume_hint() -> str:
    last = checkpoints["last"]
    where = f"from step {last}" if last is not None else "(no checkpoint was saved yet)"
    return f"rerun the same command to resume {where}"

  # ---------------------------------------------------------------- Input.
  # Process 0 makes missing data first so processes sharing a filesystem never
  # generate the same files at once; on separate disks each then makes its own.
  if process_index == 0:
    task = tasks.load(config)
  if process_count > 1:
    multihost_utils.sync_global_devices("data ready")
  if process_index != 0:
    task = tasks.load(config)
  train_iter = pipeline.task_train_iterator(
    task,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
  )

  task.splits["validation"]  # Read now: a bad file should fail before training, not at step N.

  def validation_batches():
    return pipeline.task_eval_batches(
      task,
      "validation",
      global_batch_size=config.batch_size,
      process_index=process_index,
      process_count=process_count,
    )

  # ---------------------------------------------------------------- Mesh, model, shardings.
  setup = _build(config, spec)
  logging.info(
    "Mesh %s over %d devices (%s); model %s with %s attention, %d parameters.",
    dict(setup.mesh.shape),
    jax.device_count(),
    jax.devices()[0].device_kind,
    config.model.kind,
    config.model.get("attention") or f"{config.model.get('memory')} memory",
    setup.num_params,
  )

  # The teacher, read-only on the same mesh: a missing or mismatched one fails here, before
  # the workdir's config.json is written.
  teacher = distill.load_teacher(config, spec, setup) if distill.enabled(config) else None
  teacher_args = () if teacher is None else (teacher.params,)
  if teacher is not None:
    logging.info(
      "Distilling from %s (step %d, %s with %s, %d parameters), T=%g, alpha=%g.",
      teacher.workdir,
      teacher.step,
      teacher.config.model.kind,
      teacher.config.model.get("attention"),
      teacher.num_params,
      teacher.temperature,
      teacher.alpha,
    )

  # ---------------------------------------------------------------- Checkpoint: resume or start.
  # Before compiling: a workdir of another model is refused without a compile's wait.
  fingerprint = model_fingerprint(config, spec)
  ckpt = checkpointing.Checkpointer(
    workdir,
    max_to_keep=config.max_checkpoints_to_keep,
    fingerprint=fingerprint,
    best_metric=spec.best_metric,
    best_mode=spec.best_mode,
  )
  # What fixes the sequence of training batches; a resume must not change it.
  data_order = {
    "seed": config.seed,
    "batch_size": config.batch_size,
    "process_count": process_count,
    # How the data is read (workers, caching) does not change the batches.
    "data": {k: v for k, v in config.data.to_dict().items() if k not in _READ_ONLY_DATA_KEYS},
    # And what the task's batching adds (a stream's segment length and size).
    **task.batching.order(task.splits["train"]),
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
    checkpoints["last"] = step
    logging.info("Resumed from %s at step %d.", workdir, step)
  elif config.init_from:  # Parameters only, all layers or config.init_layers.
    train_state = state.init_state(setup, params=initialization.restore_init_params(config, setup))
  else:
    train_state = state.init_state(setup)
  step = int(jax.device_get(train_state["step"]))
  if is_main:  # Only now: a run refused above leaves the workdir's config.json as it was.
    with paths.writing(workdir, then=resume_hint):
      text = config.to_json_best_effort(indent=2, sort_keys=True)
      paths.write_text(workdir / "config.json", text)

  # ---------------------------------------------------------------- Update step (compiled AOT).
  compiled_train_step, eval_step = _compile(config, spec, setup, teacher)
  memory = compiled_train_step.memory_analysis()
  if memory is not None:
    logging.info(
      "Compiled train step: %.1f MiB temporaries, %.1f MiB arguments per device.",
      memory.temp_size_in_bytes / 2**20,
      memory.argument_size_in_bytes / 2**20,
    )

  # ---------------------------------------------------------------- Loop.
  with paths.writing(workdir, then=resume_hint):
    writer = MetricWriter(
      workdir,
      enabled=is_main,
      total_steps=config.num_train_steps,
      initial_step=step,
      stage=stage,
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
    with paths.writing(workdir, then=resume_hint):
      writer.write(host[-1][0], "train", means)
    t_log, step_log, paused = time.perf_counter(), host[-1][0], 0.0

  def save(at_step: int, metrics: dict | None = None):
    check_finite()  # Never checkpoint parameters that went NaN.
    with paths.writing(workdir, then=resume_hint):
      ckpt.save(
        at_step,
        train_state,
        data_state={"train_iterator": train_iter.get_state(), "order": data_order},
        metrics=metrics,
      )
    checkpoints["last"] = at_step

  while step < config.num_train_steps:
    batch = sharding.global_batch(next(train_iter), setup.batch_sharding)
    with jax.transfer_guard("disallow"):
      train_state, metrics = compiled_train_step(train_state, batch, *teacher_args)
    step += 1
    pending.append((step, metrics))
    writer.advance(step)

    if step % config.log_every_steps == 0:
      flush_train_metrics()
      if lock.lost:
        raise workdir_lib.WorkdirBusyError(f"Stopping: {lock.lost}.")
    is_last = step == config.num_train_steps
    t_pause = time.perf_counter()
    if step % config.eval_every_steps == 0 or is_last:
      last_eval = evaluate(
        eval_step,
        train_state["params"],
        setup.init_carry(config.batch_size, training=False),
        validation_batches(),
        setup.batch_sharding,
        setup.objective,
        max_batches=config.num_eval_batches,
      )
      last_eval_step = step
      with paths.writing(workdir, then=resume_hint):
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
    record = {"step": last_eval_step, **{k: float(v) for k, v in last_eval.items()}}
    with paths.writing(workdir, then=resume_hint):
      paths.write_text(workdir / "validation.json", json.dumps(record, indent=2))
  return last_eval
