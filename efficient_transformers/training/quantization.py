"""int8 quantization with qwix: post-training (PTQ, `ptq_model`) and quantization-aware
training (QAT, `qat_model`).

What is quantized, in both: the kernel of every matmul layer (`nnx.Linear`,
`nnx.LinearGeneral`, `nnx.Einsum`): the attention's query/key/value/output
projections, the MLP, the classifier head and a language model's output
layer. Weights are int8, symmetric, one scale per output channel (absmax
calibration; qwix maps absmax to 127.5, the edge of int8's last bucket). Mode
"int8" also quantizes the activations entering those matmuls, dynamically (one
scale per row, computed from the row itself), so no calibration data is needed.
What stays float, on purpose:

- embedding lookups (`nnx.Embed`): a gather, no matmul, and the table is read
  one row per token, so int8 would save memory but no compute;
- the attention's own matmuls between activations (q·kᵀ, p·v, and the
  approximations' feature maps): their operands are recomputed each step, so
  quantizing them is a numerics change of the attention, not of its weights;
- norms, biases and the state-space mixers' per-channel parameters (not matmuls).

Only the layers named above are quantized: the qwix rules list their module
paths exactly (`quantized_paths`), so nothing else in a model is caught by a
regular expression by accident.

PTQ stores the quantized kernels as qwix `QArray`s (int8 `qvalue`, float32
`scale`) in the model's Params; `quantized_bytes` counts what that saves. QAT
keeps float Params, so a float checkpoint restores into a QAT model and back:
qwix fakes the quantization in the forward pass and passes gradients straight
through it.
"""

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx, traverse_util

from efficient_transformers.errors import ConfigError

MODES = ("none", "int8_weights", "int8")

# Layers whose kernels are quantized: every matmul layer Flax NNX has.
_MATMUL_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def check_mode(mode: str, *, what: str) -> str:
  """`mode` if it is one of MODES; a ConfigError naming `what` (the flag or key) otherwise."""
  if mode not in MODES:
    raise ConfigError(f"{what}={mode!r} is not one of {', '.join(MODES)}.")
  return mode


def quantized_paths(model: nnx.Module) -> tuple[str, ...]:
  """The module paths (qwix's "a/b/0/c" form) of the matmul layers a rule quantizes."""
  return tuple(
    "/".join(map(str, path))
    for path, module in nnx.iter_modules(model)
    if isinstance(module, _MATMUL_LAYERS)
  )


def rules(model: nnx.Module, mode: str) -> list[qwix.QtRule]:
  """The qwix rules of `mode` for `model`: int8 kernels of its matmul layers, and with
  "int8" their input activations too (dynamic range). Empty for "none"."""
  check_mode(mode, what="mode")
  paths = quantized_paths(model)
  if mode == "none" or not paths:
    return []
  return [
    qwix.QtRule(
      module_path="|".join(re.escape(p) for p in paths),
      weight_qtype=jnp.int8,
      act_qtype=jnp.int8 if mode == "int8" else None,
    )
  ]


def sample_inputs(model: nnx.Module, fields: dict, objective) -> tuple:
  """Zero inputs of one row for the model's `__call__`, in its call order.

  Args:
    model: the (float) model.
    fields: the task's fields, name -> (shape of one row, dtype) (`TaskSpec.fields`).
    objective: the task's objective; its `input_names` give the call order, and an
      objective with a carry (a language model's memory) passes an empty one and one
      segment of ids.
  """
  carry = objective.init_carry(model, 1, training=False)
  if carry is None:
    return tuple(
      jnp.zeros((1, *fields[name][0]), jnp.dtype(fields[name][1])) for name in objective.input_names
    )
  (name,) = objective.input_names
  return (jnp.zeros((1, model.segment_length), jnp.dtype(fields[name][1])), carry)


# What qwix cannot quantize in our models, and why: (config key, value, post-training
# only?, reason). Checked from the config, before a checkpoint is restored or a step compiled.
_UNSUPPORTED = (
  (
    "reversible",
    True,
    False,
    "the reversible layers run their matmuls under a custom gradient on plain arrays, where "
    "qwix cannot tell a kernel from an activation",
  ),
  (
    "kind",
    "segmented",
    True,
    "its segments run under nnx.scan, where qwix's post-training quantization cannot swap a "
    "kernel for its int8 copy",
  ),
  (
    "attention",
    "lstm",
    True,
    "the LSTM cell's matmuls run under nnx.scan, where qwix's post-training quantization "
    "cannot swap a kernel for its int8 copy",
  ),
  (
    "attention",
    "gru",
    True,
    "the GRU cell's matmuls run under nnx.scan, where qwix's post-training quantization "
    "cannot swap a kernel for its int8 copy",
  ),
  (
    "memory",
    "compressive",
    True,
    "its reconstruction loss reads the attention's kernels directly, which post-training "
    "quantization replaces by int8 arrays",
  ),
)


def check_supported(model_cfg, mode: str, *, post_training: bool, what: str) -> None:
  """A ConfigError naming `what` (the flag or key that asked for `mode`) and the config.model
  key that qwix cannot quantize; nothing for mode "none" or a supported model.

  Args:
    model_cfg: config.model.
    mode: one of MODES.
    post_training: PTQ (eval.py --quantize) rather than QAT (config.model.quantization).
    what: the flag or config key that set `mode`.
  """
  check_mode(mode, what=what)
  if mode == "none":
    return
  for key, value, ptq_only, reason in _UNSUPPORTED:
    if (post_training or not ptq_only) and model_cfg.get(key) == value:
      raise ConfigError(
        f"{what}={mode!r} does not work with config.model.{key}={value!r}: {reason}."
      )


def ptq_model(
  model: nnx.Module, mode: str, inputs: Sequence, *, what: str = "this model"
) -> nnx.Module:
  """Post-training quantization: a copy of the trained float `model` whose matmul kernels
  are stored as int8 qwix `QArray`s with their float32 scales.

  A model trained with quantization-aware training (`qat_model`) is quantized the same
  way (qwix starts again from its float class).

  Args:
    model: the trained float model (left unchanged).
    mode: "int8_weights" or "int8" (weights and activations); "none" returns `model`.
    inputs: positional inputs of the model's `__call__` (`sample_inputs`); qwix runs the
      model once on them to find the matmuls and quantize their kernels. Their values do
      not matter.
    what: names the model in errors, e.g. "config.model.attention='lstm'"; the configs
      qwix is known to fail on are refused earlier, naming their key (`check_supported`).
  """
  check_mode(mode, what="mode")
  if mode == "none":
    return model
  provider = qwix.PtqProvider(rules(model, mode))
  try:
    # Jitted: the one run that finds the matmuls and quantizes their kernels is compiled
    # once instead of dispatched op by op (several times faster on CPU).
    quantized = nnx.jit(
      lambda m, args: qwix.quantize_model(m, provider, *args, deterministic=True)
    )(model, tuple(inputs))
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - qwix's own errors name no config key.
    raise ConfigError(
      f"Post-training quantization ({mode}) does not work with {what}: qwix failed with "
      f"{type(e).__name__}: {_first_line(e)}"
    ) from None
  missing = [p for p in quantized_paths(model) if not _is_quantized(_at(quantized, p))]
  if missing:
    raise ConfigError(
      f"Post-training quantization ({mode}) does not work with {what}: qwix did not see "
      f"the matmuls of {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}."
    )
  return quantized


def qat_model(model: nnx.Module, mode: str, inputs: Sequence, *, check: bool = False):
  """Quantization-aware training: `model` with qwix's fake quantization in its forward pass
  (an int8 round trip of the matmul kernels, and of their inputs with "int8") and a
  straight-through backward. Its Params are the float model's, unchanged, so float
  checkpoints restore into it and its checkpoints into a float model.

  qwix intercepts the model's `__call__` (a language model's `run` goes through it).
  With dynamic-range activations (qwix's default outside ODML) it keeps no statistics,
  hence adds no state.

  Args:
    model: the float model.
    mode: "int8_weights" or "int8"; "none" returns `model`.
    inputs: positional inputs of the model's `__call__` (`sample_inputs`).
    check: run the model once on `inputs` (as qwix does by default) and check that qwix
      added no state; the training setup does this once, abstractly. Without it qwix
      only wraps the class.
  """
  check_mode(mode, what="config.model.quantization")
  if mode == "none":
    return model
  provider = _QtProvider(rules(model, mode))
  before = jax.tree.structure(nnx.state(model))
  try:
    quantized = qwix.quantize_model(
      model, provider, *inputs, deterministic=True, skip_nnx_init=not check
    )
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - qwix's own errors name no config key.
    raise ConfigError(
      f"config.model.quantization={mode!r} does not work with model "
      f"{type(model).__name__}: qwix failed with {type(e).__name__}: {_first_line(e)}"
    ) from None
  if check and jax.tree.structure(nnx.state(quantized)) != before:
    raise ConfigError(
      f"config.model.quantization={mode!r}: qwix added state to model "
      f"{type(model).__name__}; its checkpoints would not match the float model's."
    )
  return quantized


class _QtProvider(qwix.QtProvider):
  """qwix's QtProvider, with a matmul layer's input never taken for a second kernel.

  qwix tells a weight from an activation by tracing it back to one of the layer's Params
  and, failing that, by shape. An input shaped like a Param (pooled features [batch,
  features] into a head whose kernel is [features, features], with batch == features)
  would pass for a weight, and qwix stops on "lhs and rhs cannot be both weights". Our
  matmul layers (nnx.Linear, nnx.LinearGeneral) put their input on the left: it gets a
  leading unit axis no Param has, removed again from the output, which changes nothing
  else (a reshape, free in XLA; one more size-1 axis on the activation's scale).
  """

  def dot_general(
    self,
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    out_sharding=None,
  ):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    shift = lambda axes: tuple(a + 1 for a in axes)
    out = super().dot_general(
      lhs[None],
      rhs,
      ((shift(lhs_contract), rhs_contract), (shift(lhs_batch), rhs_batch)),
      precision,
      preferred_element_type,
      out_sharding=out_sharding,
    )
    # Output axes: batch axes, then lhs's free axes (the unit axis first), then rhs's.
    return jnp.squeeze(out, axis=len(lhs_batch))


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else "(no message)"


def _at(model: nnx.Module, path: str):
  node = model
  for key in path.split("/") if path else ():
    node = node[int(key)] if key.isdigit() else getattr(node, key)
  return node


def _is_quantized(layer: nnx.Module) -> bool:
  return any(isinstance(v, qwix.QArray) for v in _kernels(layer))


def _kernels(layer: nnx.Module) -> list:
  """The kernel value(s) of a matmul layer: a float array, or qwix's QArray after PTQ."""
  out = []
  for name in ("kernel",):
    var = getattr(layer, name, None)
    if var is None:
      continue
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    out.append(getattr(value, "array", value))  # ptq.WithAux holds the QArray.
  return out


def quantized_weight_dtypes(model: nnx.Module) -> dict[str, jnp.dtype]:
  """The stored dtype of each matmul layer's kernel, by module path (int8 after PTQ)."""
  out = {}
  for path in quantized_paths(model):
    for kernel in _kernels(_at(model, path)):
      out[path] = kernel.qvalue.dtype if isinstance(kernel, qwix.QArray) else kernel.dtype
  return out


def quantized_bytes(model_or_params) -> dict[str, int]:
  """Bytes of the parameters as stored, against the same parameters in float32.

  Args:
    model_or_params: a model, its `nnx.State` of Params, or a pure dict of them. A qwix
      QArray appears there as {"qvalue", "scale"[, "zero_point"]}, which is how it is
      counted: as one quantized array.

  Returns:
    param_bytes: every parameter array as stored: int8 values, their float scales and
      the float parameters left unquantized.
    float32_param_bytes: the same parameters, all float32 (the float model's size).
    quantized_bytes / float32_quantized_bytes: the same two figures for the quantized
      kernels alone (int8 values with their scales, against their float32 originals).
  """
  if isinstance(model_or_params, nnx.Module):
    model_or_params = nnx.state(model_or_params, nnx.Param)
  if isinstance(model_or_params, nnx.State):
    model_or_params = nnx.to_pure_dict(model_or_params)
  flat = traverse_util.flatten_dict(model_or_params)
  quantized = {path[:-1] for path in flat if path[-1] == "qvalue"}
  out = dict.fromkeys(
    ("param_bytes", "float32_param_bytes", "quantized_bytes", "float32_quantized_bytes"), 0
  )
  for path, x in flat.items():
    stored = int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    # A quantized array's scales have no float32 counterpart: the float kernel had none.
    as_float = 0 if path[-1] != "qvalue" and path[:-1] in quantized else int(np.prod(x.shape)) * 4
    out["param_bytes"] += stored
    out["float32_param_bytes"] += as_float
    if path[:-1] in quantized:
      out["quantized_bytes"] += stored
      out["float32_quantized_bytes"] += as_float
  return out
