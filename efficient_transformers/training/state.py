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
from efficient_transformers.training import optimizers, sharding, steps


def build_model(
  model_cfg: ml_collections.ConfigDict, *, vocab_size: int, num_classes: int, rngs: nnx.Rngs
) -> nnx.Module:
  """The model named by `config.model.kind` (a key of `models.MODELS`), built from config.model."""
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


def is_recurrent(model_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the model carries a memory between steps (its state then holds it)."""
  return hasattr(models.MODELS.get(model_cfg.kind), "init_memory")


def check_model_fits_task(model_cfg: ml_collections.ConfigDict, task_name: str, stream: bool):
  """A clear error for a model kind that cannot read the task's batches."""
  if model_cfg.kind not in models.MODELS:
    raise ConfigError(
      f"config.model.kind={model_cfg.kind!r} is unknown; valid: {', '.join(models.MODELS)}."
    )
  if stream != is_recurrent(model_cfg):
    raise ConfigError(
      f"config.model.kind={model_cfg.kind!r} does not fit task {task_name!r}: a "
      "language-model task needs a model with a memory interface (kind='decoder_lm'), a "
      "classification task a classifier."
    )


@dataclasses.dataclass
class TrainSetup:
  """Everything static about a run: mesh, model structure, optimizer, shardings."""

  mesh: Mesh
  graphdef: nnx.GraphDef
  rest: nnx.State  # Non-parameter model state (dropout RNG streams).
  input_names: tuple[str, ...]
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: dict  # ShapeDtypeStructs carrying their shardings.
  state_shardings: dict
  batch_sharding: NamedSharding
  init_params: Callable[[], dict]  # Creates the params already sharded.
  num_params: int
  rules: tuple
  # Recurrent models: (global batch size, memory kwargs) -> empty memory, sharded on
  # the batch axis; None for models without memory.
  init_memory: "_MemoryInitializer | None" = None
  bptt_segments: int = 1

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

  def compile_train_step(self, batch_spec: dict, *, seed: int, grad_accum_steps: int = 1):
    """The train step compiled ahead of time, state donated: (state, batch) -> (state, metrics)."""
    if self.init_memory is not None:
      if grad_accum_steps != 1:
        raise ConfigError(
          "config.optimizer.grad_accum_steps must be 1 for a recurrent-memory model: its "
          "memory rows follow the batch rows from step to step."
        )
      fn = steps.make_recurrent_train_step(
        graphdef=self.graphdef,
        rest=self.rest,
        tx=self.tx,
        schedule=self.schedule,
        seed=seed,
        bptt_segments=self.bptt_segments,
      )
    else:
      fn = steps.make_train_step(
        graphdef=self.graphdef,
        rest=self.rest,
        tx=self.tx,
        schedule=self.schedule,
        input_names=self.input_names,
        seed=seed,
        grad_accum_steps=grad_accum_steps,
      )
    with self.context():
      return (
        jax.jit(fn, donate_argnums=0, out_shardings=(self.state_shardings, None))
        .lower(self.abstract_state, batch_spec)
        .compile()
      )

  def compile_eval_step(self, batch_spec: dict, memory: dict | None = None):
    """The eval step compiled for batches shaped like `batch_spec`.

    Classifiers: (params, batch with a weight field) -> sums. Recurrent models:
    (params, memory, batch) -> (sums, memory), for a memory shaped like `memory`.
    """
    if self.init_memory is not None:
      fn = steps.make_recurrent_eval_step(graphdef=self.graphdef, rest=self.rest)
      abstract_memory = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), memory
      )
      memory_shardings = jax.tree.map(lambda x: x.sharding, abstract_memory)
      with self.context():
        return (
          jax.jit(fn, donate_argnums=1, out_shardings=(None, memory_shardings))
          .lower(self.abstract_state["params"], abstract_memory, batch_spec)
          .compile()
        )
    spec = dict(batch_spec)
    first = next(iter(batch_spec.values()))
    spec["weight"] = jax.ShapeDtypeStruct(
      first.shape[:1], jnp.float32, sharding=self.batch_sharding
    )
    fn = steps.make_eval_step(graphdef=self.graphdef, rest=self.rest, input_names=self.input_names)
    with self.context():
      return jax.jit(fn).lower(self.abstract_state["params"], spec).compile()


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
  config: ml_collections.ConfigDict,
  *,
  vocab_size: int,
  num_classes: int,
  devices: list | None = None,
) -> TrainSetup:
  """Resolves the mesh (over `devices`, default all) and the sharded abstract train state."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple(config.sharding_rules)

  def create():
    return build_model(
      config.model,
      vocab_size=vocab_size,
      num_classes=num_classes,
      rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
    )

  abstract_model = nnx.eval_shape(create)
  graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = sharding.param_shardings(abstract_params, mesh, rules)
  # The RNG streams are small; make them concretely, once.
  rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2])()

  def _init_params():
    return nnx.to_pure_dict(nnx.split(create(), nnx.Param, ...)[1])

  init_params = jax.jit(_init_params, out_shardings=param_shardings)

  tx, schedule = optimizers.make_optimizer(config.optimizer, config.num_train_steps)
  abs_params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nnx.to_pure_dict(abstract_params),
    param_shardings,
  )
  abs_opt = jax.eval_shape(tx.init, abs_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abs_opt,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
  abstract = {
    "params": abs_params,
    "opt_state": abs_opt,
    "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  init_memory = None
  if hasattr(abstract_model, "init_memory"):
    batch_axes = sharding.batch_sharding(mesh, rules).spec[0]
    init_memory = _MemoryInitializer(abstract_model, mesh, batch_axes)
    memory = init_memory.abstract(config.batch_size)
    state_shardings["memory"] = jax.tree.map(lambda x: x.sharding, memory)
    abstract["memory"] = memory
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shardings
  )
  num_params = sum(int(x.size) for x in jax.tree.leaves(abs_params))
  return TrainSetup(
    mesh=mesh,
    graphdef=graphdef,
    rest=rest,
    input_names=tuple(type(abstract_model).input_names),
    tx=tx,
    schedule=schedule,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    batch_sharding=sharding.batch_sharding(mesh, rules),
    init_params=init_params,
    num_params=num_params,
    rules=rules,
    init_memory=init_memory,
    bptt_segments=int(config.model.get("bptt_segments") or 1),
  )


class _MemoryInitializer:
  """Makes a recurrent model's empty memory, sharded like the batch on its batch axis.

  The batch axis of each memory entry is found by shape (the axis that grows
  with the batch size), so a memory layout needs no declaration here.
  """

  def __init__(self, abstract_model, mesh: Mesh, batch_axes):
    self._model = abstract_model
    self._mesh = mesh
    self._batch_axes = batch_axes  # The mesh axes of the batch dimension.

  def abstract(self, batch_size: int, **lengths) -> dict:
    """ShapeDtypeStructs of the memory, with their shardings."""
    memory = jax.eval_shape(lambda: self._model.init_memory(batch_size, **lengths))
    bigger = jax.eval_shape(lambda: self._model.init_memory(batch_size + 1, **lengths))

    def with_sharding(x, y):
      spec = [None] * x.ndim
      for axis, (a, b) in enumerate(zip(x.shape, y.shape, strict=True)):
        if a != b:
          spec[axis] = self._batch_axes
          break
      return jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(self._mesh, PartitionSpec(*spec))
      )

    return jax.tree.map(with_sharding, memory, bigger)

  def __call__(self, batch_size: int, **lengths) -> dict:
    """The empty memory (zeros; validity flags False), placed on the mesh."""
    return zeros_like_abstract(self.abstract(batch_size, **lengths))


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
  if setup.init_memory is not None:
    state["memory"] = zeros_like_abstract(setup.abstract_state["memory"])
  return state
