"""`evaluate_checkpoint(config, workdir, which)`: test-split evaluation of a saved model."""

import json
import os

import jax
import ml_collections
from absl import logging

from efficient_transformers.data import pipeline, tasks
from efficient_transformers.errors import CheckpointError
from efficient_transformers.training import checkpointing, state
from efficient_transformers.training.evaluation import evaluate, model_fingerprint


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
  setup = state.make_setup(config, vocab_size=task.vocab_size, num_classes=task.num_classes)
  ckpt = checkpointing.Checkpointer(workdir, fingerprint=model_fingerprint(config, task))
  if ckpt.latest_step() is None and ckpt.best_step() is None:
    raise CheckpointError(
      f"No checkpoint in {workdir}. Train first: python train.py --config=... --workdir={workdir}"
    )
  if which == "best" and ckpt.best_step() is None:
    raise CheckpointError(f"{workdir} has no best checkpoint yet (no evaluation has run).")
  step, params = ckpt.restore_params(setup.abstract_state["params"], which=which)
  ckpt.close()
  arrays = task.splits[split]
  batch_spec = setup.batch_spec(arrays, config.batch_size)
  eval_step = setup.compile_eval_step(batch_spec)
  batches = pipeline.eval_batches(
    arrays,
    global_batch_size=config.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  metrics = evaluate(eval_step, params, batches, setup.batch_sharding)
  results = {
    "task": config.task,
    "attention": config.model.attention,
    "checkpoint": which,
    "step": int(step),
    split: {"accuracy": metrics["accuracy"], "loss": metrics["loss"]},
    "num_examples": int(metrics["num_examples"]),
    "device_kind": jax.devices()[0].device_kind,
    "platform": jax.default_backend(),
    "num_devices": jax.device_count(),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  logging.info("%s", results)
  return results
