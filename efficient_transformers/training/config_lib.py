"""Helpers for config files: the `get_config(arg)` argument string and locking.

A config arg is a comma-separated list of flags and key=value pairs, e.g.
`smoke,attention=memory_efficient`. Each config file declares the names it
accepts; anything else is an error that lists them.
"""

import typing
from collections.abc import Mapping

import ml_collections

from efficient_transformers.errors import ConfigError


def parse_arg(arg: str | None, defaults: Mapping[str, object], *, config_file: str) -> dict:
  """Parses `arg` against `defaults` (name -> default value; bools are flags).

  Values are converted to the type of their default. Raises ConfigError naming
  the unknown name and the valid ones.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
        f"Unknown config arg {key!r} in {config_file}:{arg}. Valid: {', '.join(sorted(defaults))}."
      )
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"Config arg {key!r} in {config_file} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"Config arg {key}={value!r} in {config_file} must be true or false.")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, int):
      try:
        out[key] = int(value)
      except ValueError:
        raise ConfigError(f"Config arg {key}={value!r} in {config_file} must be an int.") from None
    elif isinstance(default, float):
      try:
        out[key] = float(value)
      except ValueError:
        raise ConfigError(f"Config arg {key}={value!r} in {config_file} must be a float.") from None
    else:
      out[key] = value
  return out


# Variant kwargs for the smoke configs' short sequences (~65 positions), where the
# paper-scale defaults (blocks of 64) would make every structured variant one
# dense block. The full configs keep each variant's own defaults.
SMOKE_ATTENTION_KWARGS = {
  "memory_efficient": dict(query_chunk_size=32, key_chunk_size=32),
  "local": dict(block_size=16),
  "sparse": dict(block_size=16),
  "longformer": dict(window=8),
  "bigbird": dict(block_size=8),
  "reformer": dict(chunk_size=16, num_buckets=8),
  "sinkhorn": dict(block_size=16),
  "nystromformer": dict(num_landmarks=16),
  "linformer": dict(k=16),
  "performer": dict(num_features=64),
}


def attention_defaults(
  name: str, *, smoke: bool = False, sequence_length: int | None = None
) -> ml_collections.ConfigDict:
  """The declared keyword arguments of attention (or mixer) `name` with their defaults.

  Putting them in the config makes every variant kwarg overridable from the
  command line (`--config.model.attention_kwargs.KEY=VALUE`) and recorded in
  the run's config.

  Args:
    name: a registered attention name.
    smoke: use SMOKE_ATTENTION_KWARGS for the variant's block sizes.
    sequence_length: the positions the encoder attends over (tokens plus a CLS
      token); sets the `max_length` of variants with learned length-sized
      parameters (Linformer, Sinkhorn, Synthesizer).
  """
  from efficient_transformers.models import mixing  # Registers every variant and mixer.

  try:
    declared = mixing.variant_kwargs(name)
  except ConfigError as e:  # An unknown name, from a config file's attention= arg.
    raise ConfigError(
      f"{e.message} (set by config.model.attention, or the config arg attention=NAME)"
    ) from None
  kwargs = {}
  for key, param in declared.items():
    if key in ("dtype", "param_dtype"):
      continue  # Set from config.model.dtype.
    if param.default is param.empty:
      raise ConfigError(f"attention {name!r} requires keyword {key!r}; set it in the config.")
    kwargs[key] = param.default
    if param.default is None:
      # A typed placeholder: --config.model.attention_kwargs.KEY=VALUE cannot set a
      # plain None field (ml_collections does not know its type).
      kwargs[key] = ml_collections.config_dict.placeholder(_optional_type(param.annotation))
  if smoke:
    kwargs.update(SMOKE_ATTENTION_KWARGS.get(name, {}))
  if sequence_length is not None and "max_length" in declared:
    kwargs["max_length"] = sequence_length
  # Allow None-valued defaults to be overridden by a value of another type.
  return ml_collections.ConfigDict(kwargs, type_safe=False)


def _optional_type(annotation) -> type:
  """`str` for `str | None` (or "str | None"); `object` if it cannot tell."""
  if isinstance(annotation, str):
    names = [a.strip() for a in annotation.split("|") if a.strip() != "None"]
    return {"str": str, "int": int, "float": float, "bool": bool}.get(names[0], object)
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if len(args) == 1 and isinstance(args[0], type) else object


# Logical axis -> mesh axes: the one table mapping the names the models use.
SHARDING_RULES = (
  # Data: the batch axis of inputs and activations.
  ("batch", ("data", "fsdp")),
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  # Parameters: FSDP shards the embedding axis, tensor parallelism heads/MLP.
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("vocab", None),
  # The leading axis of parameters stacked for model.scan_layers: not sharded.
  ("layers", None),
)


def lra_base(*, task: str, attention: str, data_dir: str) -> ml_collections.ConfigDict:
  """Every key an LRA task config has, set to the values the tasks share.

  A task config (configs/lra/*.py) starts from this and sets what differs:
  its data keys, model size, batch, steps and schedule. The defaults are the
  original LRA code's ListOps/Text settings: Adam(0.9, 0.98, 1e-9) with weight
  decay 0.1, learning rate 0.05 x linear warmup x rsqrt decay, dropout 0.1,
  sinusoidal positions, CLS pooling.
  """
  c = training_base(task=task, data_dir=data_dir)
  c.model.kind = "classifier"  # classifier | dual_encoder
  c.model.attention = attention
  c.model.attention_kwargs = ml_collections.ConfigDict()  # Set by `finish`.
  c.model.num_layers = 4
  c.model.emb_dim = 512
  c.model.num_heads = 8
  c.model.qkv_dim = 512
  c.model.mlp_dim = 1024
  c.model.classifier_dim = 1024
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.1
  c.model.positional = "sinusoidal"  # sinusoidal | learned | axial | rope | alibi | none
  c.model.pooling = "cls"  # cls | mean
  c.model.max_length = 2_000
  layer_options(c.model)
  return c


def layer_options(model: ml_collections.ConfigDict) -> None:
  """The stack's layer options (models.Stack), at their defaults: the plain stack."""
  model.reversible = False  # Reversible residual layers (Reformer).
  # none | all | N (N consecutive layers share one block; as a string from the
  # command line, e.g. --config.model.share_layers=2).
  model.share_layers = "none"
  model.scan_layers = False  # One nnx.scan over parameters stacked on a "layers" axis.
  model.remat_policy = "none"  # none | full | dots_saveable | nothing_saveable


def training_base(*, task: str, data_dir: str) -> ml_collections.ConfigDict:
  """The keys of every training config besides the model's: loop, optimizer, mesh.

  The values are the original LRA code's ListOps/Text settings (see `lra_base`);
  `c.data` and `c.model` are left for the task config to fill.
  """
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.data_dir = data_dir
  c.batch_size = 32
  c.num_train_steps = 5_000
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.max_checkpoints_to_keep = 3
  c.num_eval_batches = -1  # -1 = the whole split.
  c.init_from = ""  # A checkpoint directory to start from when the workdir has none.

  c.data = ml_collections.ConfigDict()  # The task's own keys.
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # Compute dtype; parameters stay float32.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = "rsqrt"  # rsqrt | cosine | constant
  c.optimizer.warmup_steps = 1_000
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-9
  c.optimizer.grad_clip_norm = 0.0  # 0 = no clipping.
  c.optimizer.grad_accum_steps = 1  # Micro-batches per step (same global batch).
  # The state-space mixers' Λ and Δ (mixers.SSM_PARAMETER_NAMES) in their own group, as
  # S4/S5/LRU train them: this learning rate (same schedule), ssm_weight_decay. None = one
  # group for every parameter.
  c.optimizer.ssm_learning_rate = ml_collections.config_dict.placeholder(float)
  c.optimizer.ssm_weight_decay = 0.0

  # Mesh axis sizes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_rules = SHARDING_RULES
  return c


def smoke_model(c: ml_collections.ConfigDict) -> None:
  """The smoke configs' small model and optimizer: minutes on a laptop CPU."""
  c.model.num_layers = 2
  c.model.emb_dim = 64
  c.model.num_heads = 4
  c.model.qkv_dim = 64
  c.model.mlp_dim = 128
  c.model.classifier_dim = 128
  c.model.dropout_rate = 0.0
  c.model.attention_dropout_rate = 0.0
  c.batch_size = 32
  c.log_every_steps = 50
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 0.0


# Memory vectors of the segment-by-segment classifier (`segment=N` config args).
SEGMENTED_MEMORY_TOKENS = 8


def finish(
  c: ml_collections.ConfigDict, *, smoke: bool, segment: int = 0
) -> ml_collections.ConfigDict:
  """Fills in the attention's kwargs for the final model size, then locks the config.

  With `segment` > 0 the model reads its input `segment` tokens at a time with
  a recurrent memory (models.SegmentedClassifier, kind 'segmented'): the
  attention spans one segment plus the memory vectors, whatever the input
  length, and the head reads the final memory (mean over its vectors).
  """
  span = c.model.max_length + (c.model.pooling == "cls")
  if segment < 0:
    raise ConfigError(f"Config arg segment={segment} must be >= 1 (0: no segments).")
  if segment:
    c.model.kind = "segmented"
    c.model.pooling = "mean"
    c.model.segment_length = segment
    c.model.num_memory_tokens = SEGMENTED_MEMORY_TOKENS
    c.model.remat = True  # One segment's activations at a time in the backward pass.
    span = segment + SEGMENTED_MEMORY_TOKENS
  c.model.attention_kwargs = attention_defaults(
    c.model.attention, smoke=smoke, sequence_length=span
  )
  return finalize(c)


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config: setting a key it does not have is an error."""
  config.lock()
  return config
