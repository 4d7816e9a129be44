"""The device mesh, logical-axis rules, and placing data on the mesh.

Mesh axes are ('data', 'fsdp', 'tensor'), sized by `config.mesh` (-1 = the
rest). Parameters carry logical axis names (layers/partitioning.py); the one
rules table `config.sharding_rules` maps them onto mesh axes.
"""

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_transformers.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves `config.mesh` against the device count; raises ConfigError if it cannot."""
  sizes = [int(cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"At most one of config.mesh.{{data,fsdp,tensor}} may be -1; got {sizes}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh sizes must be positive or -1; got {sizes}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  named = dict(zip(MESH_AXES, sizes, strict=True))
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh {named} does not divide {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(
      f"config.mesh {named} needs {int(np.prod(sizes))} devices; there are {num_devices}."
    )
  return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  # jax.make_mesh lays the axes out along the physical topology (TPU ICI, NVLink).
  # Auto axes: shardings are propagated by XLA from the annotations we give.
  return jax.make_mesh(
    shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(shape)
  )


def logical_to_mesh(spec: PartitionSpec, rules: Sequence) -> PartitionSpec:
  """Maps a PartitionSpec of logical names to one of mesh axes, strictly.

  A name missing from the rules table is a config error rather than silently
  replicated, so a new layer cannot escape sharding unnoticed.
  """
  table = dict(rules)
  out = []
  for name in spec:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ConfigError(
        f"Logical axis {name!r} has no entry in config.sharding_rules "
        f"(it has: {', '.join(table)}). Add a rule mapping it to a mesh axis or None."
      )
    out.append(table[name])
  return PartitionSpec(*out)


def param_shardings(abstract_params, mesh: Mesh, rules: Sequence):
  """NamedShardings for an nnx.State of abstract Params, as a pure dict."""
  logical = nnx.get_partition_spec(abstract_params)  # Names as written by the layers.
  logical = nnx.to_pure_dict(logical)
  return jax.tree.map(
    lambda s: NamedSharding(mesh, logical_to_mesh(s, rules)),
    logical,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def batch_sharding(mesh: Mesh, rules: Sequence) -> NamedSharding:
  """Sharding of a batch's leading axis, by the 'batch' rule."""
  return NamedSharding(mesh, logical_to_mesh(PartitionSpec("batch"), rules))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into one global array per field."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }
