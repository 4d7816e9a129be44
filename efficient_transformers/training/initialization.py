"""`config.init_from`: starting a run from another run's parameters, all or chosen layers.

Parameters only: the source's optimizer, data position and process count do not matter,
and its attention may differ where the parameters line up. With `config.init_layers` a
shallower student starts from chosen layers of a deeper model (block j from source layer
layers[j]; "every_other" takes 0, 2, 4, ...), everything else (embeddings, final norm,
head) from the source as it is, the way DistilBERT initializes its student.
"""

import re

import ml_collections
from absl import logging

from efficient_transformers import paths
from efficient_transformers.errors import CheckpointError, ConfigError
from efficient_transformers.training import checkpointing

# A block's parameters sit under ".../stack/blocks/<layer>/..." in every model kind.
_BLOCK = re.compile(r"^(.*\bstack/blocks)/(\d+)/")


def parse_layers(value: str, *, num_layers: int, source_layers: int) -> list[int] | None:
  """config.init_layers -> the source layer of each student block (None: all, in order).

  Raises ConfigError naming the key when the list does not fit the student's
  `num_layers` or names a layer the source lacks.
  """
  value = (value or "").strip()
  if not value:
    return None
  if value == "every_other":
    layers = list(range(0, 2 * num_layers, 2))
  else:
    try:
      layers = [int(v) for v in value.split(",")]
    except ValueError:
      raise ConfigError(
        f"config.init_layers={value!r} must be 'every_other' or comma-separated source "
        "layer indices, e.g. '0,2'."
      ) from None
  if len(layers) != num_layers:
    raise ConfigError(
      f"config.init_layers={value!r} names {len(layers)} layers; the model has "
      f"config.model.num_layers={num_layers}: name one source layer per layer."
    )
  bad = [i for i in layers if not 0 <= i < source_layers]
  if bad:
    raise ConfigError(
      f"config.init_layers={value!r} asks for source layers {layers}; config.init_from has "
      f"{source_layers} (0 to {source_layers - 1})."
    )
  return layers


def _block_prefixes(shapes: dict) -> dict[str, set[int]]:
  """{".../stack/blocks": the layer indices stored under it} of a stored parameter tree."""
  found: dict[str, set[int]] = {}
  for path in shapes:
    match = _BLOCK.match(path)
    if match:
      found.setdefault(match.group(1), set()).add(int(match.group(2)))
  return found


def _remap(tree, layers: list[int], *, inverse: bool = False):
  """`tree` with each stack's block j renamed source layer layers[j] (or back, `inverse`)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, sub in tree.items():
    if key == "stack" and isinstance(sub, dict) and isinstance(sub.get("blocks"), dict):
      blocks = sub["blocks"]
      if inverse:
        renamed = {j: blocks[layers[j]] for j in range(len(layers))}
      else:
        renamed = {layers[int(j)]: block for j, block in blocks.items()}
      out[key] = {**{k: v for k, v in sub.items() if k != "blocks"}, "blocks": renamed}
    else:
      out[key] = _remap(sub, layers, inverse=inverse)
  return out


def _restore_encoder(source, which, setup) -> dict:
  """Fresh parameters with the source's encoder: a self-pretrained encoder under a new head.

  A source embedding table with more rows than this model's (the pretraining model's
  [MASK] id, `models.TokenPredictor`) is read whole and cut to this vocabulary.
  """
  import jax

  abstract = setup.abstract_state["params"]
  if "encoder" not in abstract:
    raise ConfigError(
      "config.init_encoder_only restores an encoder: this model has none (config.model.kind)."
    )
  _, _, shapes = source.stored(which)

  def as_stored(path, a):
    stored = shapes.get("encoder/" + checkpointing.path_str(path))
    if stored and stored[1:] == a.shape[1:] and stored[0] > a.shape[0]:
      return jax.ShapeDtypeStruct(stored, a.dtype, sharding=a.sharding)
    return a

  wanted = {"encoder": jax.tree_util.tree_map_with_path(as_stored, abstract["encoder"])}
  _, restored = source.restore_params(wanted, which=which, check_fingerprint=False, subset=True)
  params = setup.init_params()
  params["encoder"] = jax.tree.map(
    lambda r, a: jax.device_put(r[: a.shape[0]], a.sharding) if r.shape != a.shape else r,
    restored["encoder"],
    abstract["encoder"],
  )
  return params


def restore_init_params(config: ml_collections.ConfigDict, setup) -> dict:
  """The parameters `config.init_from` gives this run (`setup`'s shapes and shardings)."""
  source = checkpointing.Checkpointer(paths.resolve(config.init_from, what="config.init_from"))
  try:
    if source.latest_step() is None and source.best_step() is None:
      raise CheckpointError(
        f"config.init_from={config.init_from!r} ({source.workdir}) holds no checkpoint."
      )
    which = "best" if source.best_step() is not None else "latest"
    abstract = setup.abstract_state["params"]
    layers = None
    if (config.get("init_layers") or "").strip():
      if config.model.get("scan_layers") or config.model.get("share_layers", "none") != "none":
        raise ConfigError(
          "config.init_layers picks layers one by one: it needs config.model.scan_layers="
          "False and config.model.share_layers='none'."
        )
      _, _, shapes = source.stored(which)
      stacks = _block_prefixes(shapes)
      if not stacks:
        raise CheckpointError(
          f"config.init_from={config.init_from!r} holds no layer-by-layer blocks "
          "(stack/blocks/<layer>) for config.init_layers to choose from."
        )
      source_layers = min(max(found) + 1 for found in stacks.values())
      layers = parse_layers(
        config.init_layers, num_layers=config.model.num_layers, source_layers=source_layers
      )
    if config.get("init_encoder_only"):
      if layers is not None:
        raise ConfigError("config.init_encoder_only and config.init_layers do not combine.")
      params = _restore_encoder(source, which, setup)
    elif layers is None:
      _, params = source.restore_params(abstract, which=which, check_fingerprint=False)
    else:
      _, params = source.restore_params(
        _remap(abstract, layers), which=which, check_fingerprint=False, subset=True
      )
      params = _remap(params, layers, inverse=True)
  finally:
    source.close()
  logging.info(
    "Initialized parameters from %s (%s)%s.",
    source.workdir,
    which,
    f", layers {layers}"
    if layers is not None
    else (", the encoder only" if config.get("init_encoder_only") else ""),
  )
  return params
