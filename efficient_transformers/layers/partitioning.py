"""Logical axis names for parameters and activations.

Modules name their axes logically ('batch', 'length', 'embed', 'heads', 'kv',
'mlp', 'vocab'); the training config holds one rules table mapping those names
onto the mesh axes ('data', 'fsdp', 'tensor'). Outside a mesh (a user importing
a single module) the annotations are inert.
"""

from collections.abc import Sequence

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

LogicalAxes = Sequence[str | None]

# Activations [batch, length, features] get names of their own: "embed" shards
# parameters over fsdp, while the activation batch already uses that mesh axis.
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


def param_axes(*names: str | None) -> dict:
  """Variable metadata naming a parameter's logical axes.

  Eager sharding is off so modules can be built without a mesh; the training
  system resolves these names (`nnx.get_partition_spec` under
  `nnx.logical_axis_rules`) and creates the state directly sharded.
  """
  return {"out_sharding": tuple(names), "eager_sharding": False}


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = dict(spmd.get_logical_axis_rules())
  spec = []
  for name in names:
    target = rules.get(name) if name is not None else None
    spec.append(target)
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
