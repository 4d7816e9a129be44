"""`evaluate_checkpoint(config, workdir, which)`: test-split evaluation of a saved model."""

import json

import jax
import ml_collections
from absl import logging

from efficient_transformers import paths
from efficient_transformers.data import pipeline, tasks
from efficient_transformers.errors import CheckpointError
from efficient_transformers.training import checkpointing, quantization, spt, state, steps
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
  quantize: str = "none",
) -> dict:
  """Restores checkpoint `which`, evaluates `split`, writes the results as JSON.

  Args:
    config: the config the run was trained with.
    workdir: the run's workdir, as the user wrote it (or gs://...).
    which: "best", "latest" or a step.
    split: the split to evaluate.
    results_path: where to write the results; default `workdir/results.json`
      (`workdir/results_<quantize>.json` for a quantized evaluation).
    quantize: "none", or post-training quantization of the restored float model
      (`quantization.ptq_model`) before it is evaluated: "int8_weights" or "int8"
      (weights and activations). The results record the mode and the parameter bytes
      as stored against float32.
  """
  # Before anything is read or restored: a mode qwix cannot apply to this model is named.
  quantization.check_supported(config.model, quantize, post_training=True, what="--quantize")
  workdir = workdir_lib.prepare(workdir, create=False)
  if results_path:
    results_path = paths.resolve(results_path, what="--results")
  else:  # A quantized evaluation leaves the float one's results as they are.
    results_path = workdir / ("results.json" if quantize == "none" else f"results_{quantize}.json")
  stage = {}
  if spt.enabled(config):  # A self-pretrained run: its fine-tuned classifier is scored.
    config, workdir = spt.finetune_run(config, workdir)
    stage = {"stage": "finetune"}
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
  eval_batch = setup.abstract_batch(spec.eval_fields, config.batch_size)
  if quantize == "none":
    eval_step = setup.compile_eval_step(eval_batch)
  else:
    eval_step, params = _compile_quantized_eval_step(config, spec, setup, params, quantize)
  sizes = quantization.quantized_bytes(params)  # As stored: int8 kernels after quantizing.
  carry = setup.init_carry(config.batch_size, training=False)
  metrics = evaluate(eval_step, params, carry, batches, setup.batch_sharding, objective)
  count = {objective.count_name: int(metrics.pop(objective.count_name))}
  scores = metrics
  results = {
    "task": config.task,
    "attention": config.model.get("attention"),
    **({"memory": config.model.memory} if "memory" in config.model else {}),
    **stage,
    "checkpoint": which,
    "step": int(step),
    "quantize": quantize,
    split: scores,
    **count,
    "param_bytes": sizes["param_bytes"],
    "float32_param_bytes": sizes["float32_param_bytes"],
    "device_kind": jax.devices()[0].device_kind,
    "platform": jax.default_backend(),
    "num_devices": jax.device_count(),
  }
  if jax.process_index() == 0:
    with paths.writing(results_path.parent):
      paths.write_text(results_path, json.dumps(results, indent=2))
  logging.info("%s", results)
  return results


def _compile_quantized_eval_step(config, spec, setup: state.TrainSetup, params, mode: str):
  """(eval step, quantized params) of the restored model after post-training quantization.

  The float model is merged on the host as `restore_model` does, quantized by qwix
  (`quantization.ptq_model`), and its own graph and state (int8 kernels and their scales)
  compiled into the eval step the float model would get: (params, carry, batch) ->
  (sums, carry), batches sharded as in training, the quantized params replicated.
  """
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  model = nnx.merge(setup.graphdef, jax.device_get(params), jax.device_get(setup.rest))
  inputs = quantization.sample_inputs(model, spec.fields, setup.objective)
  keys = [k for k in ("kind", "attention", "memory") if k in config.model]
  what = ", ".join(f"config.model.{k}={config.model[k]!r}" for k in keys)
  with state.naming_config_keys():
    quantized = quantization.ptq_model(model, mode, inputs, what=what)
  graphdef, qparams, rest = nnx.split(quantized, nnx.Param, ...)
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  qparams = jax.device_put(qparams, replicated)
  batch_spec = setup.abstract_batch(spec.eval_fields, config.batch_size)
  carry = setup.carry.abstract(config.batch_size, training=False)
  carry_shardings = jax.tree.map(lambda x: x.sharding, carry)
  fn = steps.make_eval_step(graphdef=graphdef, rest=rest, objective=setup.objective)
  with setup.context(), state.naming_config_keys():
    compiled = (
      jax.jit(fn, donate_argnums=1, out_shardings=(None, carry_shardings))
      .lower(qparams, carry, batch_spec)
      .compile()
    )
  return compiled, qparams
