"""Structured attention-head pruning by importance (Michel, Levy & Neubig 2019).

"Are Sixteen Heads Really Better than One?" gates each head's output with a
variable xi_h (y = sum_h xi_h o_h W_out[h] + b) and scores the head by

    I_h = E_x |dL(x) / dxi_h|   at xi = 1,

normalized per layer by its l2 norm; the least important heads, over all
layers together, are removed. At xi = 1 the gate's gradient is the parameter
gradient of the out projection read per head,

    dL/dxi_h = sum_{kv, embed} W_out[h] * dL/dW_out[h],

since dL/dW_out[h][d, e] = sum_tokens o_h[d] dL/dy[e]: no change to the model.

The pruned model has genuinely smaller shapes: its q/k/v (and any per-head)
parameters are sliced along their heads axis, and it is built with
`config.model.heads_per_layer` (`models.Stack`), each head keeping head_dim.
Its outputs equal the original's with the removed heads' out-projection rows
zeroed (`mask_heads`, the reference).

    model, task, setup = eval_lib.restore_model(config, workdir)
    batches = pipeline.task_eval_batches(task, "validation", global_batch_size=32)
    importance = head_importance(model, setup.objective, batches)
    keep = choose_heads(importance, prune=0.25)
    small, small_config = pruned_model(config, model, keep)

Supported: every attention variant whose heads are independent functions of
their own parameters: softmax, dot_product, memory_efficient, local, sparse,
longformer, linear, performer (its random features are shared by the heads),
linformer, nystromformer, sinkhorn, synthesizer, and reformer (its hash
rotations are drawn afresh on every call for num_heads heads, so a pruned
Reformer equals the masked one in distribution, not draw by draw); positions
none, rope and relative. Refused (ConfigError): position="alibi" (the slopes
are a function of num_heads, so the kept heads' slopes would change); bigbird
with random blocks (each head's random blocks are drawn by its index among
num_heads); baseline mixers (no heads); and shared, scanned or reversible
layers (the layers must be unlike).
"""

import copy
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient_transformers.attention.base import (
  OUT_KERNEL_AXES,
  QKV_BIAS_AXES,
  QKV_KERNEL_AXES,
  MultiHeadAttention,
)
from efficient_transformers.errors import ConfigError

# Attention parameters (and non-parameter state) with a heads axis, by name inside the
# attention module. A projection in_features -> (heads, kv): the base q/k/v, Transformer-
# XL's W_r, Longformer's global projections.
_PROJECTIONS = ("query", "key", "value", "position", "query_global", "key_global", "value_global")
# Per-head arrays whose first axis is the heads axis: Transformer-XL's u and v biases,
# Sinkhorn's sorting network, the Synthesizer's forms and mixture weights.
_HEADS_FIRST = (
  "u_bias",
  "v_bias",
  "sort_weights",
  "synth_kernel",
  "synth_bias",
  "synth_kernel_a",
  "synth_bias_a",
  "synth_kernel_b",
  "synth_bias_b",
  "random_logits",
  "random_factor_1",
  "random_factor_2",
  "mix_synthesized",
  "mix_dot",
)


def _heads_axis(path: tuple, leaf, *, strict: bool) -> int | None:
  """The heads axis of the attention module's leaf at `path` (None: not per head).

  strict (parameters): a name not known here is a ConfigError, so a variant with
  per-head parameters this table lacks cannot be pruned silently wrong. The tests
  check the table against every variant's logical-axis metadata.
  """
  name, last = path[0], path[-1]
  if name in _PROJECTIONS:
    axes = {"kernel": QKV_KERNEL_AXES, "bias": QKV_BIAS_AXES}[last]
    return axes.index("heads")
  if name == "out":
    return OUT_KERNEL_AXES.index("heads") if last == "kernel" else None  # Bias kept whole.
  if name in _HEADS_FIRST:
    return 0
  if name == "conv_kernel":  # Nystromformer's depthwise skip [kernel_size, heads].
    return 1
  if name in ("key_projection", "value_projection"):  # Linformer: [heads,] max_length, k.
    return 0 if np.ndim(leaf) == 3 else None
  if strict:
    raise ConfigError(
      f"head pruning: attention parameter {'/'.join(map(str, path))!r} has no known heads "
      "axis (a baseline mixer, or a variant that head_pruning._heads_axis does not list)."
    )
  return None


def _blocks(tree: dict) -> dict:
  """The per-layer blocks {i: block} of a model's (params or state) pure dict."""
  stack = tree.get("encoder", tree).get("stack")
  blocks = None if stack is None else stack.get("blocks")
  if not isinstance(blocks, dict) or not all(isinstance(k, int) for k in blocks):
    raise ConfigError(
      "head pruning takes a model with one block per layer (params['encoder']['stack']"
      "['blocks'][i]): not scan_layers, whose blocks are stacked on one axis."
    )
  return blocks


def _with_blocks(tree: dict, blocks: dict) -> dict:
  """A copy of `tree` with its stack's blocks replaced (the rest shared, not copied)."""
  out = dict(tree)
  owner = out
  if "encoder" in out:
    owner = out["encoder"] = dict(out["encoder"])
  owner["stack"] = {**owner["stack"], "blocks": blocks}
  return out


def heads_of(params: dict) -> tuple[int, ...]:
  """The head count of each layer of a model's params (the out projections' heads axis)."""
  blocks = _blocks(params)
  out_axis = OUT_KERNEL_AXES.index("heads")
  heads = []
  for i in sorted(blocks):
    kernel = blocks[i].get("attention", {}).get("out", {}).get("kernel")
    if kernel is None or np.ndim(kernel) != 3:
      raise ConfigError(
        f"head pruning: layer {i} has no attention out projection [heads, kv, embed] "
        "(a baseline mixer has no heads to prune)."
      )
    heads.append(int(np.shape(kernel)[out_axis]))
  return tuple(heads)


def check_prunable(model: nnx.Module) -> None:
  """A ConfigError naming the setting unless `model`'s heads can be pruned (module doc)."""
  stack = getattr(getattr(model, "encoder", model), "stack", None)
  if stack is None:
    raise ConfigError(
      f"head pruning: {type(model).__name__} has no encoder stack (model kind "
      "'classifier' or 'dual_encoder')."
    )
  for name, active, off in (
    ("share_layers", stack.share_every != 1, "'none'"),
    ("scan_layers", stack.scan_layers, "False"),
    ("reversible", stack.reversible, "False"),
    ("memory", stack.memory_kind != "none", "'none'"),
  ):
    if active:
      raise ConfigError(
        f"head pruning needs layers that may differ; set config.model.{name}={off}."
      )
  for block in stack.blocks:
    check_prunable_attention(block.attention)


def check_prunable_attention(attention: nnx.Module) -> None:
  """A ConfigError naming the setting unless the heads of this mixer can be pruned."""
  name = getattr(type(attention), "registered_name", type(attention).__name__)
  if not isinstance(attention, MultiHeadAttention):
    raise ConfigError(
      f"head pruning: mixer {name!r} (config.model.attention) has no attention heads."
    )
  if attention.position_kind == "alibi":
    raise ConfigError(
      "head pruning: position 'alibi' gives each head a slope that depends on num_heads, "
      "so pruning would change the kept heads; use another config.model.positional (e.g. 'rope')."
    )
  if name == "bigbird" and attention.num_random_blocks:
    raise ConfigError(
      "head pruning: bigbird draws each head's random blocks by its index among num_heads, "
      "so pruning would change the kept heads; set "
      "config.model.attention_kwargs.num_random_blocks=0 or prune another attention."
    )


def head_importance(
  model: nnx.Module | tuple,
  objective,
  batches: Iterable[dict],
  *,
  normalize: bool = True,
) -> np.ndarray | list[np.ndarray]:
  """Michel et al.'s head importance I_h = E |dL/dxi_h| over `batches`.

  The absolute value is taken per batch, as Michel et al.'s code does (batches of
  one example give the per-example expectation); the sum over batches is divided
  by the number of examples scored.

  Args:
    model: an nnx model, or (graphdef, params, rest) as `nnx.split(model, nnx.Param,
      ...)` or a train setup gives them (params may be a pure dict).
    objective: the task's objective (`objectives.Classification`; `setup.objective`):
      its `apply(model, batch, None, deterministic=True)` gives sums with "loss_sum"
      and "count". Or a function loss(model, batch) -> scalar, averaged over batches.
    batches: dicts of arrays as the objective reads them (with "weight" for the eval
      pipeline's padding rows), e.g. `pipeline.task_eval_batches(task, "validation", ...)`.
    normalize: divide each layer's scores by their l2 norm (Michel et al.).

  Returns:
    [num_layers, heads] float64, or a list of [heads_i] when the layers' head counts
    differ (a pruned model).
  """
  if isinstance(model, tuple):
    graphdef, params, rest = model
    check_prunable(nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest)))
  else:
    check_prunable(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  num_heads = heads_of(params)

  def loss(p, batch):
    merged = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
    if hasattr(objective, "apply"):
      sums, _, _ = objective.apply(merged, batch, None, deterministic=True)
      return sums["loss_sum"], sums["count"]
    return objective(merged, batch), jnp.ones((), jnp.float32)  # A plain loss function.

  @jax.jit
  def batch_scores(p, batch):
    grads, count = jax.grad(loss, has_aux=True)(p, batch)
    out_axis = OUT_KERNEL_AXES.index("heads")
    scores = []
    for i in sorted(_blocks(p)):
      w = _blocks(p)[i]["attention"]["out"]["kernel"].astype(jnp.float32)
      g = _blocks(grads)[i]["attention"]["out"]["kernel"].astype(jnp.float32)
      other = tuple(a for a in range(w.ndim) if a != out_axis)
      scores.append(jnp.abs(jnp.sum(w * g, axis=other)))
    return scores, count

  totals = [np.zeros(h) for h in num_heads]
  count = 0.0
  for batch in batches:
    scores, n = jax.device_get(batch_scores(params, jax.tree.map(jnp.asarray, dict(batch))))
    totals = [t + s for t, s in zip(totals, scores, strict=True)]
    count += float(n)
  if count <= 0:
    raise ConfigError("head_importance: the batches scored no example (empty split?).")
  importance = [t / count for t in totals]
  if normalize:
    importance = [x / n if (n := np.linalg.norm(x)) > 0 else x for x in importance]
  if len(set(num_heads)) <= 1:
    return np.stack(importance) if importance else np.zeros((0, 0))
  return importance


def choose_heads(
  importance: np.ndarray | Sequence[Sequence[float]], *, prune: int | float
) -> tuple[tuple[int, ...], ...]:
  """The heads to keep after removing the least important ones over all layers together.

  Args:
    importance: per layer, one score per head ([num_layers, heads] or a list).
    prune: how many heads to remove (an int), or a fraction of all heads (a float in
      [0, 1], rounded to the nearest count). A layer's last head is never removed:
      the next least important head elsewhere goes instead.

  Returns:
    The kept head indices of each layer, ascending.
  """
  layers = [np.asarray(x, np.float64).reshape(-1) for x in importance]
  total = sum(len(x) for x in layers)
  if any(not np.all(np.isfinite(x)) for x in layers):
    raise ConfigError("choose_heads: the importance scores must be finite.")
  if isinstance(prune, bool) or not isinstance(prune, int | float | np.integer | np.floating):
    raise ConfigError(f"choose_heads: prune={prune!r} must be a head count or a fraction.")
  if isinstance(prune, float | np.floating):
    if not 0.0 <= prune <= 1.0:
      raise ConfigError(f"choose_heads: prune={prune!r}, a fraction, must be in [0, 1].")
    count = int(np.floor(prune * total + 0.5))
  else:
    count = int(prune)
  most = total - sum(1 for x in layers if len(x))
  if not 0 <= count <= most:
    raise ConfigError(
      f"choose_heads: prune={prune!r} removes {count} of {total} heads; between 0 and "
      f"{most} can go (every layer keeps one)."
    )
  remaining = [len(x) for x in layers]
  removed = [set() for _ in layers]
  # Ascending importance; ties by layer then head, so the choice is reproducible.
  order = sorted((float(v), i, h) for i, x in enumerate(layers) for h, v in enumerate(x))
  for _, i, h in order:
    if sum(len(r) for r in removed) == count:
      break
    if remaining[i] > 1:
      removed[i].add(h)
      remaining[i] -= 1
  return tuple(tuple(h for h in range(len(x)) if h not in removed[i]) for i, x in enumerate(layers))


def removed_heads(
  keep: Sequence[Sequence[int]], heads: Sequence[int]
) -> tuple[tuple[int, ...], ...]:
  """The complement of `keep` in each layer of `heads` heads (`heads_of(params)`)."""
  _check_heads(keep, heads, what="keep")
  return tuple(
    tuple(h for h in range(n) if h not in set(k)) for k, n in zip(keep, heads, strict=True)
  )


def _check_heads(selection, heads: Sequence[int], *, what: str, nonempty: bool = False):
  if len(selection) != len(heads):
    raise ConfigError(
      f"head pruning: {what} has {len(selection)} layers; the model has {len(heads)}."
    )
  for i, (chosen, n) in enumerate(zip(selection, heads, strict=True)):
    chosen = list(chosen)
    if len(set(chosen)) != len(chosen) or any(
      not isinstance(h, int | np.integer) or not 0 <= h < n for h in chosen
    ):
      raise ConfigError(
        f"head pruning: {what}[{i}]={tuple(chosen)!r} must be distinct head indices in [0, {n})."
      )
    if nonempty and not chosen:
      raise ConfigError(f"head pruning: {what}[{i}] is empty; every layer keeps a head.")


def _slice_attention(tree, index: np.ndarray, *, strict: bool, path: tuple = ()):
  """The attention module's (pure dict) tree with every heads axis taken at `index`."""
  if isinstance(tree, dict):
    return {k: _slice_attention(v, index, strict=strict, path=(*path, k)) for k, v in tree.items()}
  axis = _heads_axis(path, tree, strict=strict)
  return tree if axis is None else jnp.take(jnp.asarray(tree), index, axis=axis)


def _prune_tree(tree: dict, keep, *, strict: bool) -> dict:
  blocks = _blocks(tree)
  new_blocks = {}
  for i in sorted(blocks):
    block = dict(blocks[i])
    if "attention" in block:
      index = np.asarray(sorted(keep[i]), np.int32)
      block["attention"] = _slice_attention(block["attention"], index, strict=strict)
    new_blocks[i] = block
  return _with_blocks(tree, new_blocks)


def prune_heads(params: dict, keep: Sequence[Sequence[int]]) -> tuple[dict, tuple[int, ...]]:
  """Slices a model's params down to the heads in `keep`.

  Args:
    params: a classifier's params (`nnx.to_pure_dict` layout).
    keep: per layer, the head indices to keep (`choose_heads`); at least one each.

  Returns:
    (the params of the pruned model, its heads_per_layer). Every parameter of an
    attention module with a heads axis is sliced (q/k/v kernels and biases, the out
    kernel, and per-head parameters of the variant); the out bias is kept whole.
  """
  _check_heads(keep, heads_of(params), what="keep", nonempty=True)
  new_params = _prune_tree(params, keep, strict=True)
  return new_params, tuple(len(k) for k in keep)


def prune_state(rest: dict, keep: Sequence[Sequence[int]]) -> dict:
  """`prune_heads` for a model's non-parameter state (`nnx.to_pure_dict` of
  `nnx.state(model, nnx.Not(nnx.Param))`): per-head entries (a Synthesizer's fixed
  random logits) are sliced; the rest (RNG streams, Performer's features, shared by
  the heads) is kept as it is."""
  stack = rest.get("encoder", rest).get("stack")
  if not isinstance(stack, dict) or "blocks" not in stack:
    return rest  # No per-layer state at all.
  return _prune_tree(rest, keep, strict=False)


def mask_heads(params: dict, removed: Sequence[Sequence[int]]) -> dict:
  """The same model with the `removed` heads' out-projection rows zeroed: the reference a
  pruned model equals (their contributions are masked, their parameters kept)."""
  heads = heads_of(params)
  _check_heads(removed, heads, what="removed")
  out_axis = OUT_KERNEL_AXES.index("heads")
  blocks = _blocks(params)
  new_blocks = {}
  for i in sorted(blocks):
    kernel = jnp.asarray(blocks[i]["attention"]["out"]["kernel"])
    shape = [1] * kernel.ndim
    shape[out_axis] = heads[i]
    gate = np.ones(heads[i], np.float32)
    gate[list(removed[i])] = 0.0
    kernel = kernel * jnp.asarray(gate.reshape(shape), kernel.dtype)
    attention = {**blocks[i]["attention"], "out": {**blocks[i]["attention"]["out"]}}
    attention["out"]["kernel"] = kernel
    new_blocks[i] = {**blocks[i], "attention": attention}
  return _with_blocks(params, new_blocks)


def pruned_model(
  config: ml_collections.ConfigDict, model: nnx.Module, keep: Sequence[Sequence[int]]
) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """The genuinely smaller model with only the heads in `keep`, and its config.

  The config is a copy of `config` with config.model.heads_per_layer set; the model
  is built from it (`state.build_model`) and given the sliced params and the
  original's non-parameter state (RNG streams, Performer's features, ...; per-head
  entries sliced too), so it computes what `mask_heads` computes.

  Args:
    config: the config `model` was built from (config.model is read).
    model: a classifier (`eval_lib.restore_model` gives a trained one).
    keep: per layer, the head indices to keep (`choose_heads`).
  """
  from efficient_transformers.training import state  # state imports the train step.

  check_prunable(model)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  new_params, heads = prune_heads(nnx.to_pure_dict(params), keep)
  new_rest = prune_state(nnx.to_pure_dict(rest), keep)
  new_config = copy.deepcopy(config)
  with new_config.unlocked():
    new_config.model.heads_per_layer = heads
  encoder = model.encoder
  abstract = nnx.eval_shape(
    lambda: state.build_model(
      new_config.model,
      vocab_size=encoder.embed.tokens.num_embeddings,
      num_classes=model.head.logits.out_features,
      rngs=nnx.Rngs(0),
    )
  )
  graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
  for target, values in ((abstract_params, new_params), (abstract_rest, new_rest)):
    _check_like(nnx.to_pure_dict(target), values)
    nnx.replace_by_pure_dict(target, values)
  return nnx.merge(graphdef, abstract_params, abstract_rest), new_config


def _check_like(expected: dict, actual: dict) -> None:
  """A ConfigError unless the two trees have the same paths and shapes."""
  flat = lambda tree: {
    jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  want, got = flat(expected), flat(actual)
  if want != got:
    where = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[0]
    raise ConfigError(
      f"pruned_model: config.model does not describe this model (at {where}: "
      f"{want.get(where)} expected, {got.get(where)} given); pass the config it was built from."
    )
