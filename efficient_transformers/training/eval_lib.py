"""`evaluate_checkpoint(config, workdir, which)`: test-split evaluation of a saved model."""

import json
import os

import jax
import ml_collections
from absl import logging

from efficient_transformers.data import pipeline, tasks
from efficient_transformers.errors import CheckpointError
from efficient_transformers.training import checkpointing, state, train_lib
from efficient_transformers.training.evaluation import (
  evaluate,
  evaluate_stream,
  model_fingerprint,
)


def parse_which(value: str) -> str | int:
  """'best' | 'latest' | a step number."""
  if value in ("best", "latest"):
    return value
  try:
    return int(value)
  except ValueError:
    raise CheckpointError(
      f"--checkpoint must be best, latest or a step number; got {value!r}."
    ) from None


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, *, which: str | int = "best", split: str = "test"
) -> dict:
  """Restores checkpoint `which`, evaluates `split`, writes `workdir/results.json`."""
  task = tasks.load(config, generate=False)
  state.check_model_fits_task(config.model, config.task, task.stream)
  setup = state.make_setup(config, vocab_size=task.vocab_size, num_classes=task.num_classes)
  ckpt = checkpointing.Checkpointer(
    workdir,
    fingerprint=model_fingerprint(config, task),
    best_metric=task.best_metric,
    best_mode=task.best_mode,
  )
  if ckpt.latest_step() is None and ckpt.best_step() is None:
    raise CheckpointError(
      f"No checkpoint in {workdir}. Train first: python train.py --config=... --workdir={workdir}"
    )
  if which == "best" and ckpt.best_step() is None:
    raise CheckpointError(f"{workdir} has no best checkpoint yet (no evaluation has run).")
  step, params = ckpt.restore_params(setup.abstract_state["params"], which=which)
  ckpt.close()
  _, length = train_lib.stream_lengths(config)
  batches = pipeline.task_eval_batches(
    task,
    split,
    global_batch_size=config.batch_size,
    sequence_length=length,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  if task.stream:
    lengths = train_lib.eval_memory_lengths(config)
    spec = setup.batch_spec(train_lib.batch_fields(task, 1, length), config.batch_size)
    eval_step = setup.compile_eval_step(
      spec, memory=setup.init_memory.abstract(config.batch_size, **lengths)
    )
    memory = setup.init_memory(config.batch_size, **lengths)
    metrics = evaluate_stream(eval_step, params, memory, batches, setup.batch_sharding)
    scores = {k: metrics[k] for k in ("bits_per_byte", "loss", "accuracy")}
    count = {"num_tokens": int(metrics["num_tokens"])}
  else:
    eval_step = setup.compile_eval_step(setup.batch_spec(task.splits[split], config.batch_size))
    metrics = evaluate(eval_step, params, batches, setup.batch_sharding)
    scores = {"accuracy": metrics["accuracy"], "loss": metrics["loss"]}
    count = {"num_examples": int(metrics["num_examples"])}
  results = {
    "task": config.task,
    "attention": config.model.get("attention"),
    **({"memory": config.model.memory} if "memory" in config.model else {}),
    "checkpoint": which,
    "step": int(step),
    split: scores,
    **count,
    "device_kind": jax.devices()[0].device_kind,
    "platform": jax.default_backend(),
    "num_devices": jax.device_count(),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  logging.info("%s", results)
  return results
