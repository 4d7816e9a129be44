"""Building the model and its sharded train state from a config.

Shared by training and evaluation, so both restore the same abstract state.
"""

import contextlib
import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_transformers import models
from efficient_transformers.errors import ConfigError
from efficient_transformers.training import (
  objectives,
  optimizers,
  pruning,
  quantization,
  sharding,
  steps,
)


def build_model(
  model_cfg: ml_collections.ConfigDict, *, vocab_size: int, num_classes: int, rngs: nnx.Rngs
) -> nnx.Module:
  """The model named by `config.model.kind` (a key of `models.MODELS`), built from config.model.

  The library's ConfigErrors name the constructor argument at fault; they are
  re-raised naming the config key that set it (`config_key_error`).
  """
  with naming_config_keys():
    return _build_model(model_cfg, vocab_size=vocab_size, num_classes=num_classes, rngs=rngs)


@contextlib.contextmanager
def naming_config_keys():
  """Re-raises a library ConfigError that names its argument (e.g. one raised while a step
  is traced: a sequence longer than a variant's max_length) naming the config key instead."""
  try:
    yield
  except ConfigError as e:
    if e.argument is None:
      raise
    raise config_key_error(e) from None


def config_key_error(error: ConfigError) -> ConfigError:
  """`error` (its `argument` set) re-worded to end with the config key that set the argument.

  The key is `config.model.<argument>`, `_RENAMED` applied: "... (set by
  config.model.attention_kwargs.kernel)". Errors raised when a step is traced
  (a sequence longer than a variant's max_length) can be mapped with it too.
  """
  head, dot, rest = error.argument.partition(".")
  key = _RENAMED.get(head, head) + dot + rest
  return ConfigError(f"{error.message} (set by config.model.{key})")


def _build_model(
  model_cfg: ml_collections.ConfigDict, *, vocab_size: int, num_classes: int, rngs: nnx.Rngs
) -> nnx.Module:
  if model_cfg.kind not in models.MODELS:
    raise ConfigError(
      f"config.model.kind={model_cfg.kind!r} is unknown; valid: {', '.join(models.MODELS)}."
    )
  try:
    dtype = jnp.dtype(model_cfg.dtype)
  except TypeError:
    raise ConfigError(f"config.model.dtype={model_cfg.dtype!r} is not a dtype.") from None
  cls = models.MODELS[model_cfg.kind]
  compute_dtype = None if dtype == jnp.float32 else dtype
  if model_cfg.kind not in ("classifier", "dual_encoder"):
    # Newer models take their hyperparameters by name from config.model.
    extra = {"num_classes": num_classes} if "num_classes" in _parameters(cls) else {}
    return cls(
      **_declared_kwargs(cls, model_cfg),
      **extra,
      vocab_size=vocab_size,
      dtype=compute_dtype,
      rngs=rngs,
    )
  return cls(
    num_classes=num_classes,
    pooling=model_cfg.pooling,
    classifier_dim=model_cfg.classifier_dim,
    vocab_size=vocab_size,
    max_length=model_cfg.max_length,
    num_layers=model_cfg.num_layers,
    emb_dim=model_cfg.emb_dim,
    num_heads=model_cfg.num_heads,
    qkv_dim=model_cfg.qkv_dim,
    mlp_dim=model_cfg.mlp_dim,
    attention_name=model_cfg.attention,
    attention_kwargs=model_cfg.attention_kwargs.to_dict(),
    dropout_rate=model_cfg.dropout_rate,
    attention_dropout_rate=model_cfg.attention_dropout_rate,
    positional=model_cfg.positional,
    reversible=model_cfg.reversible,
    share_layers=model_cfg.share_layers,
    scan_layers=model_cfg.scan_layers,
    remat_policy=model_cfg.remat_policy,
    heads_per_layer=tuple(model_cfg.get("heads_per_layer", ())) or None,
    dtype=compute_dtype,
    rngs=rngs,
  )


# Config keys whose constructor argument has another name.
_RENAMED = {"attention_name": "attention"}


def _parameters(cls) -> dict[str, inspect.Parameter]:
  return dict(inspect.signature(cls.__init__).parameters)


def _declared_kwargs(cls, model_cfg: ml_collections.ConfigDict) -> dict:
  """The constructor keywords of `cls` that config.model sets, by name.

  Models beyond the two LRA classifiers declare their hyperparameters as
  keyword arguments; config.model holds the same names (`attention` for
  `attention_name`), so a new model needs no code here. A required keyword the
  config lacks is a ConfigError naming it.
  """
  out = {}
  for name, param in _parameters(cls).items():
    if name in ("self", "vocab_size", "num_classes", "rngs", "dtype", "param_dtype"):
      continue
    if param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
      continue
    key = _RENAMED.get(name, name)
    if key in model_cfg:
      value = model_cfg[key]
      out[name] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    elif param.default is param.empty:
      raise ConfigError(f"config.model.{key} is required by model kind {model_cfg.kind!r}.")
  return out


def make_objective(model_cfg: ml_collections.ConfigDict, task):
  """The task's objective (`objectives.py`) for config.model, or a ConfigError when the model
  kind cannot serve it (a classifier on a language-model task, or the reverse).

  Args:
    model_cfg: config.model.
    task: a `TaskSpec` or `TaskData` (its name and objective are read).
  """
  if model_cfg.kind not in models.MODELS:
    raise ConfigError(
      f"config.model.kind={model_cfg.kind!r} is unknown; valid: {', '.join(models.MODELS)}."
    )
  cls = models.MODELS[model_cfg.kind]
  tokens = tuple(name for name in task.fields if name != "targets")  # What pretraining reads.
  objective = objectives.make(
    task.objective, cls, model_cfg, task.name, task.vocab_size, token_fields=tokens
  )
  fields = set(task.fields)
  if not set(objective.input_names) <= fields:
    raise ConfigError(
      f"config.model.kind={model_cfg.kind!r} reads {list(objective.input_names)}, but task "
      f"{task.name!r} provides {sorted(fields)}."
    )
  return objective


@dataclasses.dataclass
class TrainSetup:
  """Everything static about a run: mesh, model structure, objective, optimizer, shardings."""

  mesh: Mesh
  graphdef: nnx.GraphDef
  rest: nnx.State  # Non-parameter model state (dropout RNG streams).
  objective: object  # The task's objective (objectives.py), checked against the model.
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: dict  # ShapeDtypeStructs carrying their shardings.
  state_shardings: dict
  batch_sharding: NamedSharding
  init_params: Callable[[], dict]  # Creates the params already sharded.
  num_params: int
  rules: tuple
  carry: "_CarryInitializer"  # The objective's carry, sharded on its batch axis.
  # params -> metrics logged every step (pruning's sparsity and remaining parameters).
  param_metrics: Callable[[dict], dict] | None = None

  @property
  def input_names(self) -> tuple[str, ...]:
    """The batch fields the model reads."""
    return self.objective.input_names

  def context(self):
    """The mesh and logical-axis rules that activation constraints resolve against."""
    return _Context(self.mesh, self.rules)

  def batch_spec(self, arrays: dict, global_batch_size: int) -> dict:
    """Abstract global batch for a split's arrays, sharded on the batch axis."""
    return {
      k: jax.ShapeDtypeStruct(
        (global_batch_size, *v.shape[1:]), v.dtype, sharding=self.batch_sharding
      )
      for k, v in arrays.items()
    }

  def abstract_batch(self, fields: dict, global_batch_size: int) -> dict:
    """Abstract global batch for a task's declared fields (`TaskSpec.fields` / `eval_fields`:
    name -> (shape of one row, dtype)), sharded on the batch axis."""
    return {
      k: jax.ShapeDtypeStruct(
        (global_batch_size, *shape), jnp.dtype(dtype), sharding=self.batch_sharding
      )
      for k, (shape, dtype) in fields.items()
    }

  def init_carry(self, batch_size: int, *, training: bool = True):
    """The objective's empty carry for `batch_size` rows, placed on the mesh (None if none)."""
    return zeros_like_abstract(self.carry.abstract(batch_size, training=training))

  def compile_train_step(
    self, batch_spec: dict, *, seed: int, grad_accum_steps: int = 1, teacher=None
  ):
    """The train step compiled ahead of time, state donated: (state, batch) -> (state, metrics).

    With a `teacher` (`distill.Teacher`) the step distills from it and takes the teacher's
    parameters as a third argument, not donated: (state, batch, teacher_params).
    """
    if grad_accum_steps != 1 and "carry" in self.abstract_state:
      raise ConfigError(
        "config.optimizer.grad_accum_steps must be 1 for a model with a recurrent memory: "
        "its memory rows follow the batch rows from step to step."
      )
    fn = steps.make_train_step(
      graphdef=self.graphdef,
      rest=self.rest,
      tx=self.tx,
      schedule=self.schedule,
      objective=self.objective if teacher is None else teacher.objective(self.objective),
      seed=seed,
      grad_accum_steps=grad_accum_steps,
      param_metrics=self.param_metrics,
      teacher=None if teacher is None else (teacher.graphdef, teacher.rest),
    )
    args = (self.abstract_state, batch_spec)
    if teacher is not None:
      args += (teacher.abstract_params,)
    with self.context(), naming_config_keys():
      return (
        jax.jit(fn, donate_argnums=0, out_shardings=(self.state_shardings, None))
        .lower(*args)
        .compile()
      )

  def compile_eval_step(self, batch_spec: dict):
    """The eval step compiled for batches shaped like `batch_spec`:
    (params, carry, batch) -> (sums, carry), the carry (None, or the evaluation memory) donated.
    """
    batch_size = next(iter(batch_spec.values())).shape[0]
    carry = self.carry.abstract(batch_size, training=False)
    carry_shardings = jax.tree.map(lambda x: x.sharding, carry)
    fn = steps.make_eval_step(graphdef=self.graphdef, rest=self.rest, objective=self.objective)
    with self.context(), naming_config_keys():
      return (
        jax.jit(fn, donate_argnums=1, out_shardings=(None, carry_shardings))
        .lower(self.abstract_state["params"], carry, batch_spec)
        .compile()
      )


class _Context:
  def __init__(self, mesh, rules):
    self._stack = contextlib.ExitStack()
    self._mesh, self._rules = mesh, rules

  def __enter__(self):
    self._stack.enter_context(jax.set_mesh(self._mesh))
    self._stack.enter_context(nnx.logical_axis_rules(self._rules))
    return self

  def __exit__(self, *exc):
    return self._stack.__exit__(*exc)


def make_setup(
  config: ml_collections.ConfigDict, task, *, devices: list | None = None
) -> TrainSetup:
  """Resolves the mesh (over `devices`, default all) and the sharded abstract train state.

  Args:
    config: the run's config.
    task: the task's `TaskSpec` (or `TaskData`): vocabulary, classes, objective.
    devices: the devices of the mesh; default all.
  """
  # Configs saved before quantization existed have no key: they trained in float.
  quantize = config.model.get("quantization", "none")
  quantization.check_supported(
    config.model, quantize, post_training=False, what="config.model.quantization"
  )
  objective = make_objective(config.model, task)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple(config.sharding_rules)

  def create(*, check: bool = False):
    model = build_model(
      config.model,
      vocab_size=task.vocab_size,
      num_classes=task.num_classes,
      rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
    )
    if quantize == "none":
      return model
    # Quantization-aware training: qwix fakes int8 in the forward pass; the Params, their
    # tree and their shardings stay the float model's.
    inputs = quantization.sample_inputs(model, task.fields, objective)
    with naming_config_keys():
      return quantization.qat_model(model, quantize, inputs, check=check)

  # Once, abstractly: a model qwix cannot run through fails here, as a ConfigError.
  abstract_model = nnx.eval_shape(lambda: create(check=True))
  graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = sharding.param_shardings(abstract_params, mesh, rules)
  # The RNG streams are small; make them concretely, once.
  rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2])()

  def _init_params():
    return nnx.to_pure_dict(nnx.split(create(), nnx.Param, ...)[1])

  init_params = jax.jit(_init_params, out_shardings=param_shardings)

  tx, schedule = optimizers.make_optimizer(
    config.optimizer, config.num_train_steps, config.get("pruning")
  )
  pruned = optimizers.pruning_schedule(config.get("pruning"), config.num_train_steps) is not None
  abs_params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nnx.to_pure_dict(abstract_params),
    param_shardings,
  )
  abs_opt = jax.eval_shape(tx.init, abs_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  # Optimizer moments shard like their parameters. A parameter group (optax.multi_transform)
  # leaves an empty MaskedNode where another group's parameter sits: kept as it is.
  opt_shardings = optax.tree_map_params(
    tx,
    lambda x, s: x if isinstance(x, optax.MaskedNode) else s,
    abs_opt,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)),
  )
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
  abstract = {
    "params": abs_params,
    "opt_state": abs_opt,
    "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  batch_axes = sharding.batch_sharding(mesh, rules).spec[0]
  carry = _CarryInitializer(abstract_model, objective, mesh, batch_axes)
  train_carry = carry.abstract(config.batch_size, training=True)
  if train_carry is not None:  # Classifiers carry nothing: their state has no entry.
    state_shardings["carry"] = jax.tree.map(lambda x: x.sharding, train_carry)
    abstract["carry"] = train_carry
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shardings
  )
  num_params = sum(int(x.size) for x in jax.tree.leaves(abs_params))
  return TrainSetup(
    mesh=mesh,
    graphdef=graphdef,
    rest=rest,
    objective=objective,
    tx=tx,
    schedule=schedule,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    batch_sharding=sharding.batch_sharding(mesh, rules),
    init_params=init_params,
    num_params=num_params,
    rules=rules,
    carry=carry,
    param_metrics=pruning.sparsity_metrics if pruned else None,
  )


class _CarryInitializer:
  """Makes an objective's empty carry, sharded like the batch on its batch axis.

  The batch axis of each carry entry is found by shape (the axis that grows
  with the batch size), so a memory layout needs no declaration here.
  """

  def __init__(self, abstract_model, objective, mesh: Mesh, batch_axes):
    self._model = abstract_model
    self._objective = objective
    self._mesh = mesh
    self._batch_axes = batch_axes  # The mesh axes of the batch dimension.

  def abstract(self, batch_size: int, *, training: bool):
    """ShapeDtypeStructs of the carry, with their shardings (None without a carry)."""
    make = lambda b: self._objective.init_carry(self._model, b, training=training)
    carry = jax.eval_shape(lambda: make(batch_size))
    bigger = jax.eval_shape(lambda: make(batch_size + 1))

    def with_sharding(x, y):
      spec = [None] * x.ndim
      for axis, (a, b) in enumerate(zip(x.shape, y.shape, strict=True)):
        if a != b:
          spec[axis] = self._batch_axes
          break
      return jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(self._mesh, PartitionSpec(*spec))
      )

    return jax.tree.map(with_sharding, carry, bigger)


def zeros_like_abstract(tree):
  """Zeros (False for bools) shaped and placed like a tree of ShapeDtypeStructs.

  Made by a jitted function with those output shardings, so every process of a
  multi-host run creates only its own shards.
  """
  shardings = jax.tree.map(lambda x: x.sharding, tree)
  return jax.jit(
    lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree), out_shardings=shardings
  )()


def init_state(setup: TrainSetup, params: dict | None = None) -> dict:
  """A fresh train state (step 0), sharded; `params` (e.g. from init_from) if given."""
  if params is None:
    params = setup.init_params()
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings["step"])
  state = {"params": params, "opt_state": opt_state, "step": step}
  if "carry" in setup.abstract_state:
    state["carry"] = zeros_like_abstract(setup.abstract_state["carry"])
  return state
