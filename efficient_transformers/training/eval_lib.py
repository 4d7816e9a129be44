"""`evaluate_checkpoint(config, workdir, which)`: test-split evaluation of a saved model."""

import json

import jax
import ml_collections
from absl import logging

from efficient_transformers import paths
from efficient_transformers.data import pipeline, tasks
from efficient_transformers.errors import CheckpointError
from efficient_transformers.training import checkpointing, state
from efficient_transformers.training import workdir as workdir_lib
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


def _check_writable(path) -> None:
  """Fails now, in one line, if `path` cannot be written: not after a whole evaluation."""
  probe = path.parent / f".{path.name}.write-test-{jax.process_index()}"
  with paths.writing(path.parent, otherwise="pass --results=PATH to write the results elsewhere"):
    path.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()


def open_checkpoints(
  config: ml_collections.ConfigDict, workdir, spec
) -> checkpointing.Checkpointer:
  """The run's checkpointer; a CheckpointError naming the workdir if it holds none."""
  ckpt = checkpointing.Checkpointer(
    workdir,
    fingerprint=model_fingerprint(config, spec),
    best_metric=spec.best_metric,
    best_mode=spec.best_mode,
  )
  if ckpt.latest_step() is None and ckpt.best_step() is None:
    ckpt.close()
    raise CheckpointError(
      f"No checkpoint in {workdir}. Train first: python train.py --config=... --workdir={workdir}"
    )
  return ckpt


def restore_model(config: ml_collections.ConfigDict, workdir, *, which: str | int = "best"):
  """The trained model of a run, for inspection on one host: (model, task, setup).

  Restores checkpoint `which` params-only ("best" falls back to the latest checkpoint when
  no evaluation has picked a best yet) and merges it into an `nnx.Module` whose arrays are
  on the default device.
  """
  from flax import nnx

  workdir = workdir_lib.prepare(workdir, create=False)
  spec = tasks.describe(config)
  task = tasks.load(config, generate=False)  # A wrong data_dir is named first.
  ckpt = open_checkpoints(config, workdir, spec)
  if which == "best" and ckpt.best_step() is None:
    which = "latest"
  setup = state.make_setup(config, spec)
  _, params = ckpt.restore_params(setup.abstract_state["params"], which=which)
  ckpt.close()
  model = nnx.merge(setup.graphdef, jax.device_get(params), jax.device_get(setup.rest))
  return model, task, setup


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir,
  *,
  which: str | int = "best",
  split: str = "test",
  results_path=None,
) -> dict:
  """Restores checkpoint `which`, evaluates `split`, writes the results as JSON.

  Args:
    config: the config the run was trained with.
    workdir: the run's workdir, as the user wrote it (or gs://...).
    which: "best", "latest" or a step.
    split: the split to evaluate.
    results_path: where to write the results; default `workdir/results.json`.
  """
  workdir = workdir_lib.prepare(workdir, create=False)
  if results_path:
    results_path = paths.resolve(results_path, what="--results")
  else:
    results_path = workdir / "results.json"
  spec = tasks.describe(config)
  objective = state.make_objective(config.model, spec)  # A wrong model kind is named first.
  task = tasks.load(config, generate=False)  # A wrong data_dir is named first.
  ckpt = open_checkpoints(config, workdir, spec)
  if which == "best" and ckpt.best_step() is None:
    raise CheckpointError(f"{workdir} has no best checkpoint yet (no evaluation has run).")
  if jax.process_index() == 0:
    _check_writable(results_path)
  setup = state.make_setup(config, spec)
  step, params = ckpt.restore_params(setup.abstract_state["params"], which=which)
  ckpt.close()
  batches = pipeline.task_eval_batches(
    task,
    split,
    global_batch_size=config.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  eval_step = setup.compile_eval_step(setup.abstract_batch(spec.eval_fields, config.batch_size))
  carry = setup.init_carry(config.batch_size, training=False)
  metrics = evaluate(eval_step, params, carry, batches, setup.batch_sharding, objective)
  count = {objective.count_name: int(metrics.pop(objective.count_name))}
  scores = metrics
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
    with paths.writing(results_path.parent):
      paths.write_text(results_path, json.dumps(results, indent=2))
  logging.info("%s", results)
  return results
