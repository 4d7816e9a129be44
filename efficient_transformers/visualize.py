r"""Pictures of a trained classifier's attention: every layer and head, rollout, the input.

  python -m efficient_transformers.visualize --config=configs/lra/listops.py:smoke \
      --workdir=workdirs/listops_smoke --split=test --index=0 --out=attention_listops
  python -m efficient_transformers.visualize --patterns --out=attention_patterns

For one example (`--index` of `--split`) and the run's best checkpoint (`--checkpoint`),
every attention layer's map is captured (`attention.maps.capture`: the model's compiled
training path is not touched) and drawn into --out:

  layer{i}.png      layer i: one panel per head, the [L, L] map (queries down, keys across).
  rollout.png       attention rollout across layers (Abnar & Zuidema 2020): per layer
                    0.5 * (mean over heads) + 0.5 * I, rows renormalised, multiplied
                    from the first layer up; left the rollout, right the last layer's map.
  input.png         Image, Pathfinder, Path-X: the input image beside the attention the
                    pooled output reads over its pixels (the CLS row, or with mean
                    pooling the mean over real rows), from the rollout and the last layer.
  tokens.png        ListOps, Text, Retrieval: the same attention per token, labelled
                    with the tokens (the first 128).
  sinkhorn.png      attention=sinkhorn: each layer's learned block sort matrix per head.
  summary.json      per layer and head: mean attention distance and entropy.
  maps.npz          the raw maps (layer{i}: [heads, L, L]), the rollout, the input ids,
                    the label and the prediction, for your own analysis.

`--patterns` draws the structured variants' patterns (local, sparse fixed and strided,
Longformer, BigBird) at `--pattern_length` into patterns.png; it needs no workdir.

The maps are [L, L] per head: for inspection at short lengths (a one-line error above
`--max_length`). A run trained with `model.scan_layers=True` (parameters stacked, layers
run by one scan) cannot be captured layer by layer: the command says so.
"""

import json
import math
import sys

import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from efficient_transformers import paths
from efficient_transformers.errors import ConfigError, DataError
from efficient_transformers.training import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config the run was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's workdir.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to draw from.")
_INDEX = flags.DEFINE_integer("index", 0, "The example's index in the split.")
_OUT = flags.DEFINE_string("out", None, "Directory for the PNGs (created if missing).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 4096, "The longest sequence to draw maps for.")
_PATTERNS = flags.DEFINE_bool("patterns", False, "Draw the structured patterns' gallery only.")
_PATTERN_LENGTH = flags.DEFINE_integer("pattern_length", 64, "Sequence length of the gallery.")

IMAGE_TASKS = ("image", "pathfinder", "pathx")
MAX_TOKENS_SHOWN = 128


def rollout(maps_per_layer: list[np.ndarray]) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema 2020) of per-layer maps [heads, L, L] -> [L, L].

  Each layer's head-mean map gets the residual connection as an identity, 0.5 A + 0.5 I,
  rows renormalised; the rollout is their product from the first layer up.
  """
  length = maps_per_layer[0].shape[-1]
  result = np.eye(length)
  for weights in maps_per_layer:
    a = 0.5 * weights.mean(axis=0) + 0.5 * np.eye(length)
    a = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-12)
    result = a @ result
  return result


def head_statistics(maps_per_layer: list[np.ndarray]) -> dict:
  """Per layer and head: the mean attention distance sum_j A_ij |i - j| and the entropy
  -sum_j A_ij log A_ij, each averaged over the rows that attend (rows summing to > 0)."""
  distance, entropy = [], []
  for weights in maps_per_layer:
    length = weights.shape[-1]
    gaps = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
    rows = weights.sum(axis=-1) > 0  # [heads, L]
    per_row_distance = (weights * gaps).sum(axis=-1)
    logs = np.log(np.where(weights > 0, weights, 1.0))
    per_row_entropy = -(weights * logs).sum(axis=-1)
    count = np.maximum(rows.sum(axis=-1), 1)
    distance.append(((per_row_distance * rows).sum(-1) / count).round(4).tolist())
    entropy.append(((per_row_entropy * rows).sum(-1) / count).round(4).tolist())
  return {"mean_attention_distance": distance, "mean_entropy_nats": entropy}


def pooled_attention(matrix: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
  """What the pooled output reads over the keys: the CLS row, or the mean over real rows."""
  if pooling == "cls":
    return matrix[0]
  return matrix[mask].mean(axis=0)


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path) -> None:
  import io

  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  _pyplot().close(fig)
  paths.write_bytes(path, buffer.getvalue())


def _heads_figure(weights: np.ndarray, title: str):
  plt = _pyplot()
  heads = weights.shape[0]
  cols = min(heads, 4)
  rows = math.ceil(heads / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
  for h, ax in enumerate(axes.flat):
    ax.axis("off")
    if h < heads:
      ax.imshow(weights[h], cmap="viridis", interpolation="nearest")
      ax.set_title(f"head {h}", fontsize=8)
  fig.suptitle(title, fontsize=9)
  return fig


def _token_labels(task: str, ids: np.ndarray) -> list[str]:
  if task == "listops":
    from efficient_transformers.data import listops

    return [listops.VOCAB[i] if i < len(listops.VOCAB) else str(i) for i in ids]
  # Byte tasks: token = byte + 1.
  return [chr(i - 1) if 33 <= i - 1 < 127 else f"\\x{max(i - 1, 0):02x}" for i in ids]


def draw_example(
  out,
  *,
  task: str,
  attention_name: str,
  pooling: str,
  ids: np.ndarray,
  layers: list[np.ndarray],
  label: int,
  prediction: int,
  sort_matrices: list[np.ndarray] | None = None,
) -> list[str]:
  """Writes the PNGs and maps.npz of one example into `out`; returns the file names.

  Args:
    ids: the example's token ids [n] (without a CLS token).
    layers: per layer, the map [heads, L, L] (L = n + 1 with a CLS token).
  """
  plt = _pyplot()
  use_cls = pooling == "cls"
  mask = np.concatenate([[True] if use_cls else [], ids != 0]).astype(bool)
  # Right padding: the real positions come first; padded keys have no weight, so the maps
  # cropped to them are exact for every real row.
  real_length = int(mask.sum())
  layers = [w[:, :real_length, :real_length] for w in layers]
  mask = mask[:real_length]
  written = []
  for i, weights in enumerate(layers):
    title = f"{task}, {attention_name}, layer {i}: attention map per head (queries down)"
    _save(_heads_figure(weights, title), out / f"layer{i}.png")
    written.append(f"layer{i}.png")
  rolled = rollout(layers)
  fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
  axes[0].imshow(rolled, cmap="viridis", interpolation="nearest")
  axes[0].set_title("attention rollout", fontsize=9)
  axes[1].imshow(layers[-1].mean(axis=0), cmap="viridis", interpolation="nearest")
  axes[1].set_title("last layer, mean over heads", fontsize=9)
  fig.suptitle(f"{task}, {attention_name}: label {label}, predicted {prediction}", fontsize=9)
  _save(fig, out / "rollout.png")
  written.append("rollout.png")
  reads = {
    "rollout": pooled_attention(rolled, mask, pooling),
    "last layer": pooled_attention(layers[-1].mean(axis=0), mask, pooling),
  }
  start = 1 if use_cls else 0  # The tokens' columns.
  if task in IMAGE_TASKS:
    side = int(math.isqrt(len(ids)))
    pixels = np.zeros(len(ids))
    for name in reads:  # Padded pixels (none in LRA's images) read as 0.
      pixels[: real_length - start] = reads[name][start:]
      reads[name] = np.concatenate([reads[name][:start], pixels])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].imshow((ids - 1).reshape(side, side), cmap="gray", interpolation="nearest")
    axes[0].set_title(f"input (label {label}, predicted {prediction})", fontsize=9)
    for ax, (name, values) in zip(axes[1:], reads.items(), strict=True):
      ax.imshow(values[start:].reshape(side, side), cmap="inferno", interpolation="nearest")
      ax.set_title(f"{'CLS' if use_cls else 'mean-pooled'} attention, {name}", fontsize=9)
    for ax in axes:
      ax.axis("off")
    _save(fig, out / "input.png")
    written.append("input.png")
  else:
    real = ids[ids != 0][:MAX_TOKENS_SHOWN]
    n = len(real)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.12 * n), 5), sharex=True)
    for ax, (name, values) in zip(axes, reads.items(), strict=True):
      ax.bar(np.arange(n), values[start : start + n])
      ax.set_ylabel(name, fontsize=8)
    axes[1].set_xticks(np.arange(n))
    axes[1].set_xticklabels(_token_labels(task, real), rotation=90, fontsize=6)
    fig.suptitle(
      f"{task}, {attention_name}: attention the {'CLS token' if use_cls else 'mean pool'} "
      f"reads per token (label {label}, predicted {prediction})",
      fontsize=9,
    )
    _save(fig, out / "tokens.png")
    written.append("tokens.png")
  if sort_matrices:
    fig, axes = plt.subplots(
      1, len(sort_matrices), figsize=(3.5 * len(sort_matrices), 3.5), squeeze=False
    )
    for ax, (i, sort) in zip(axes[0], enumerate(sort_matrices), strict=True):
      ax.imshow(sort, cmap="viridis", interpolation="nearest")
      ax.set_title(f"layer {i}: block sort matrix (head 0)", fontsize=8)
      ax.set_xlabel("key block")
      ax.set_ylabel("query block")
    _save(fig, out / "sinkhorn.png")
    written.append("sinkhorn.png")
  stats = head_statistics(layers)
  paths.write_text(
    out / "summary.json",
    json.dumps(
      {
        "task": task,
        "attention": attention_name,
        "label": label,
        "prediction": prediction,
        "length": real_length,
        **stats,
      },
      indent=1,
    ),
  )
  written.append("summary.json")
  arrays = {f"layer{i}": w for i, w in enumerate(layers)}
  arrays.update(rollout=rolled, ids=ids, label=np.asarray(label), prediction=np.asarray(prediction))
  import io

  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  paths.write_bytes(out / "maps.npz", buffer.getvalue())
  written.append("maps.npz")
  return written


def draw_patterns(out, length: int) -> str:
  """The structured variants' patterns at `length` into out/patterns.png."""
  from efficient_transformers.attention import (
    bigbird_pattern,
    local_pattern,
    longformer_pattern,
    sparse_pattern,
  )

  block = max(2, length // 8)
  panels = {
    f"local (block {block}, 1 neighbour)": local_pattern(
      length, length, block_size=block, num_neighbors=1, causal=False
    ),
    f"sparse fixed (block {block})": sparse_pattern(
      length, length, pattern="fixed", block_size=block
    ),
    f"sparse strided (stride {block})": sparse_pattern(
      length, length, pattern="strided", block_size=block
    ),
    "longformer (window 4, global 0)": longformer_pattern(
      length, window=4, global_positions=(0,), causal=False
    ),
    f"bigbird (block {block // 2}, head 0)": bigbird_pattern(
      length, heads=1, block_size=block // 2
    )[0],
  }
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
  for ax, (title, pattern) in zip(axes, panels.items(), strict=True):
    ax.imshow(pattern, cmap="Greys", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"Which keys each query attends to (L = {length}, black = attended)", fontsize=9)
  _save(fig, out / "patterns.png")
  return "patterns.png"


def visualize_example(config, workdir, out, *, split, index, which, max_length) -> list[str]:
  """Restores the run's checkpoint `which`, captures example `index` of `split`, draws it."""
  from efficient_transformers.attention import maps
  from efficient_transformers.training import eval_lib

  model_cfg = config.model
  if model_cfg.get("kind") not in ("classifier", "dual_encoder"):
    raise ConfigError(
      f"visualize draws the classifiers' attention (model.kind classifier or dual_encoder); "
      f"this run's is {model_cfg.get('kind')!r}.",
      argument="kind",
    )
  if model_cfg.get("scan_layers"):
    raise ConfigError(
      "visualize captures each layer's map from the unrolled stack; this run was trained "
      "with model.scan_layers=True (its parameters are stacked), which it cannot capture.",
      argument="scan_layers",
    )
  model, task, setup = eval_lib.restore_model(config, workdir, which=which)
  arrays = task.splits[split]
  size = len(next(iter(arrays.values())))
  if not 0 <= index < size:
    raise DataError(f"--index={index} is outside the {split} split (0 .. {size - 1}).")
  inputs = [jnp.asarray(arrays[name][index : index + 1]) for name in setup.input_names]
  with maps.capture(max_length=max_length) as records:
    logits = model(*inputs, deterministic=True)
  layers = [np.asarray(r["weights"][0]) for r in records if r["weights"] is not None]
  if not layers:
    raise ConfigError(
      f"attention {model_cfg.attention!r} records no attention map (a baseline mixer, or a "
      "memory context); nothing to draw.",
      argument="attention_name",
    )
  # A dual encoder runs one tower over both documents stacked on the batch: row 0 is the
  # first document, the one drawn.
  sort_matrices = _sinkhorn_sorts(records) if model_cfg.attention == "sinkhorn" else None
  out = paths.resolve(out, what="--out")
  with paths.writing(f"--out={out}"):
    out.mkdir(parents=True, exist_ok=True)
    return draw_example(
      out,
      task=config.task,
      attention_name=model_cfg.attention,
      pooling=model_cfg.pooling,
      ids=np.asarray(inputs[0][0]),
      layers=layers,
      label=int(arrays["targets"][index]),
      prediction=int(np.argmax(np.asarray(logits)[0])),
      sort_matrices=sort_matrices,
    )


def _sinkhorn_sorts(records: list[dict]) -> list[np.ndarray]:
  """Each Sinkhorn layer's soft block sort matrix P [nb, nb] (example 0, head 0), from the
  captured layer inputs (`sinkhorn_sort_matrix`, as the layer computes it)."""
  from efficient_transformers.attention import sinkhorn

  sorts = []
  for r in records:
    module = r["module"]
    if r["attention"] != "sinkhorn" or r["weights"] is None:
      continue
    k = module.rotate(module.key(r["inputs"]))
    p = sinkhorn.sinkhorn_sort_matrix(
      k,
      mask=r["mask"],
      causal=module.causal,
      **{
        name: value
        for name, value in module.map_params().items()
        if name in ("sort_weights", "block_size", "sinkhorn_iterations", "temperature")
      },
    )
    sorts.append(np.asarray(p[0, 0]))
  return sorts


def main():
  if not _OUT.value:
    raise ConfigError("--out=DIR is required: where to write the pictures.")
  if _PATTERNS.value:
    out = paths.resolve(_OUT.value, what="--out")
    with paths.writing(f"--out={out}"):
      out.mkdir(parents=True, exist_ok=True)
      written = [draw_patterns(out, _PATTERN_LENGTH.value)]
  else:
    if _CONFIG.value is None or not _WORKDIR.value:
      raise ConfigError("--config and --workdir are required (or --patterns for the gallery).")
    from efficient_transformers.training import eval_lib

    written = visualize_example(
      _CONFIG.value,
      _WORKDIR.value,
      _OUT.value,
      split=_SPLIT.value,
      index=_INDEX.value,
      which=eval_lib.parse_which(_CHECKPOINT.value),
      max_length=_MAX_LENGTH.value,
    )
  print(json.dumps({"out": _OUT.value, "files": written}))


if __name__ == "__main__":
  cli.run(main)
  sys.exit(0)
