"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student trained against a teacher.

    python train.py --config=configs/lra/listops.py:smoke --workdir=workdirs/student \
      --config.model.num_layers=1 --config.distill.teacher_workdir=workdirs/listops_smoke

The teacher is any trained workdir of the same task: its own config (config.json, written
by train.py) says what it is, so it may use another attention or another size (exact
softmax to Performer, 4 layers to 1). Its parameters are restored params-only from its
checkpoint (`config.distill.teacher_checkpoint`), sharded like the student's on the same
mesh, and passed to the one jitted train step as an argument that is neither donated nor
updated: the teacher runs inside the step, deterministically, under stop_gradient.

The loss of one example with label y, student logits s and teacher logits t is

    (1 - alpha) CE(y, s) + alpha T^2 KL(softmax(t / T) || softmax(s / T)),

the T^2 keeping the soft term's gradients on the scale of the hard one's as T changes
(Hinton et al., section 2). With `hidden_weight` > 0 the student's pooled features are
also pulled to the teacher's (mean squared distance), where both are one-tower classifiers
of the same width. Evaluation scores the student alone, as without distillation.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from efficient_transformers import paths
from efficient_transformers.errors import CheckpointError, ConfigError
from efficient_transformers.training import checkpointing, objectives, sharding


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` distills (config.distill.teacher_workdir is set)."""
  return bool(config.get("distill") and config.distill.teacher_workdir)


def check_config(config: ml_collections.ConfigDict) -> None:
  """config.distill's values, as messages naming the key; reads nothing."""
  if not enabled(config):
    return
  d = config.distill
  if not 0.0 <= d.alpha <= 1.0:
    raise ConfigError(f"config.distill.alpha must be in [0, 1]; got {d.alpha}.")
  if not d.temperature > 0:
    raise ConfigError(f"config.distill.temperature must be > 0; got {d.temperature}.")
  if not d.hidden_weight >= 0:
    raise ConfigError(f"config.distill.hidden_weight must be >= 0; got {d.hidden_weight}.")
  _which(d.teacher_checkpoint)


def _which(value) -> str | int:
  if value in ("best", "latest"):
    return value
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(
      f"config.distill.teacher_checkpoint must be best, latest or a step number; got {value!r}."
    ) from None


def distillation_sums(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  targets: jax.Array,
  weights: jax.Array | None,
  *,
  temperature: float,
  alpha: float,
) -> dict[str, jax.Array]:
  """Summed (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T), correct count and weight
  total, like `objectives.classification_sums` (whose keys it returns), plus the two terms'
  sums ("ce_sum", "kl_sum") for logging."""
  sums = objectives.classification_sums(student_logits, targets, weights)
  w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
  s = student_logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(s, targets)
  log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_p_student = jax.nn.log_softmax(s / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  loss = (1.0 - alpha) * ce + alpha * temperature**2 * kl
  kl_sum = jnp.sum(kl * w)
  return {**sums, "loss_sum": jnp.sum(loss * w), "ce_sum": sums["loss_sum"], "kl_sum": kl_sum}


class DistillationObjective:
  """A classification objective scored against a teacher: `apply(..., teacher=model)`.

  Everything but the training loss is the base objective's (`objectives.Classification`):
  its inputs, its carry (none) and its summary, so evaluation is unchanged.
  """

  def __init__(self, base, *, temperature: float, alpha: float, hidden_weight: float = 0.0):
    self.base = base
    self.temperature, self.alpha, self.hidden_weight = temperature, alpha, hidden_weight
    self.name, self.count_name, self.input_names = base.name, base.count_name, base.input_names

  def init_carry(self, model, batch_size: int, *, training: bool):
    return self.base.init_carry(model, batch_size, training=training)

  def summarize(self, totals):
    return self.base.summarize(totals)

  def apply(self, model, batch: dict, carry, *, deterministic: bool, teacher):
    inputs = [batch[n] for n in self.input_names]
    if self.hidden_weight:  # One tower (checked by `load_teacher`): features, then the head.
      features = model.encode(*inputs, deterministic=deterministic)
      logits = model.head(features)
      teacher_features = teacher.encode(*inputs, deterministic=True)
      teacher_logits = teacher.head(teacher_features)
    else:
      logits = model(*inputs, deterministic=deterministic)
      teacher_logits = teacher(*inputs, deterministic=True)
    weights = batch.get("weight")
    sums = distillation_sums(
      logits,
      teacher_logits,
      batch["targets"],
      weights,
      temperature=self.temperature,
      alpha=self.alpha,
    )
    if self.hidden_weight:
      w = jnp.ones(batch["targets"].shape) if weights is None else weights
      gap = jnp.mean(jnp.square(features - teacher_features).astype(jnp.float32), axis=-1)
      sums["hidden_sum"] = jnp.sum(gap * w)
      sums["loss_sum"] = sums["loss_sum"] + self.hidden_weight * sums["hidden_sum"]
    return sums, carry, {}


@dataclasses.dataclass
class Teacher:
  """A trained teacher on the student's mesh: its model's structure and its parameters."""

  workdir: object
  config: ml_collections.ConfigDict  # The teacher's own run config (its config.json).
  step: int  # The checkpoint's step.
  graphdef: nnx.GraphDef
  rest: nnx.State
  abstract_params: dict  # ShapeDtypeStructs with their shardings.
  params: dict | None  # None when loaded abstractly (the dry run).
  num_params: int
  temperature: float
  alpha: float
  hidden_weight: float

  def objective(self, base) -> DistillationObjective:
    """The student's training objective against this teacher."""
    return DistillationObjective(
      base, temperature=self.temperature, alpha=self.alpha, hidden_weight=self.hidden_weight
    )


def read_run_config(workdir, *, what: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json), as a ConfigDict."""
  path = workdir / "config.json"
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise CheckpointError(
      f"{what}={workdir} has no config.json (train.py writes one): it is not a training "
      "run's workdir."
    ) from None
  try:
    return ml_collections.ConfigDict(json.loads(text))
  except ValueError as e:
    raise CheckpointError(f"{path} is not a readable config ({e}).") from None


def load_teacher(config: ml_collections.ConfigDict, spec, setup, *, restore: bool = True):
  """The teacher of `config.distill`, built from its own config on `setup`'s mesh.

  Args:
    config: the student's config.
    spec: the student's TaskSpec.
    setup: the student's `state.TrainSetup` (its mesh and sharding rules are used).
    restore: read the parameters (False: shapes only, for the dry run).

  Raises:
    CheckpointError: the teacher workdir holds no checkpoint (or no config.json).
    ConfigError: the teacher's task, vocabulary, classes or input length differ from the
      student's, or its kind cannot be distilled from.
  """
  from efficient_transformers.training import state  # state imports this module's users.

  check_config(config)
  what = "config.distill.teacher_workdir"
  if spec.objective != "classification":
    raise ConfigError(
      f"{what}: distillation is for classification tasks; task {spec.name!r} is "
      f"{spec.objective}. Leave config.distill.teacher_workdir empty."
    )
  workdir = paths.resolve(config.distill.teacher_workdir, what=what)
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    if ckpt.latest_step() is None and ckpt.best_step() is None:
      raise CheckpointError(
        f"{what}={config.distill.teacher_workdir!r} ({workdir}) holds no checkpoint: train the "
        "teacher there first, or point the key at a trained workdir."
      )
    which = _which(config.distill.teacher_checkpoint)
    if which == "best" and ckpt.best_step() is None:
      which = "latest"
    _, fingerprint, _ = ckpt.stored(which)
    for key, mine in (
      ("task", config.task),
      ("vocab_size", spec.vocab_size),
      ("num_classes", spec.num_classes),
    ):
      if key in fingerprint and fingerprint[key] != mine:
        raise ConfigError(
          f"{what}={config.distill.teacher_workdir!r}: the teacher's {key} is "
          f"{fingerprint[key]!r} and the student's is {mine!r}; distill from a teacher "
          "trained on the student's task and data."
        )
    teacher_config = read_run_config(workdir, what=what)
    t_model = teacher_config.model
    if t_model.get("max_length") != config.model.get("max_length"):
      raise ConfigError(
        f"{what}: the teacher reads inputs of length {t_model.get('max_length')} and the "
        f"student {config.model.get('max_length')} (config.model.max_length); they must match."
      )
    if t_model.kind != config.model.kind:
      raise ConfigError(
        f"{what}: the teacher is a {t_model.kind!r} model and the student a "
        f"{config.model.kind!r}; they must read the same inputs."
      )
    hidden_weight = float(config.distill.hidden_weight)
    if hidden_weight and (
      config.model.kind != "classifier" or t_model.emb_dim != config.model.emb_dim
    ):
      raise ConfigError(
        "config.distill.hidden_weight > 0 matches pooled features: it needs one-tower "
        f"classifiers of one width (student {config.model.kind!r}, {config.model.emb_dim} wide; "
        f"teacher {t_model.kind!r}, {t_model.emb_dim} wide). Set it to 0."
      )

    def create():
      return state.build_model(
        t_model,
        vocab_size=spec.vocab_size,
        num_classes=spec.num_classes,
        rngs=nnx.Rngs(params=0, dropout=1),
      )

    abstract_model = nnx.eval_shape(create)
    graphdef, abstract, _ = nnx.split(abstract_model, nnx.Param, ...)
    shardings = sharding.param_shardings(abstract, setup.mesh, setup.rules)
    abstract_params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nnx.to_pure_dict(abstract),
      shardings,
    )
    rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2])()
    step, params = None, None
    if restore:
      step, params = ckpt.restore_params(abstract_params, which=which, check_fingerprint=False)
  finally:
    ckpt.close()
  return Teacher(
    workdir=workdir,
    config=teacher_config,
    step=step,
    graphdef=graphdef,
    rest=rest,
    abstract_params=abstract_params,
    params=params,
    num_params=sum(int(x.size) for x in jax.tree.leaves(abstract_params)),
    temperature=float(config.distill.temperature),
    alpha=float(config.distill.alpha),
    hidden_weight=hidden_weight,
  )
