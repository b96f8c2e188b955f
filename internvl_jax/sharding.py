"""Device mesh and the one table mapping logical axis names to mesh axes.

Every parameter carries logical axis names (metadata key `axes`); activations are constrained
with logical names at block boundaries. `LOGICAL_AXIS_RULES` maps both to the mesh axes
`data`, `fsdp`, `tensor`. A mesh axis that does not divide a dimension is dropped for that
dimension (the model pads the dimensions where this would matter: vocab, ViT heads).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from internvl_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("kv_heads", "tensor"),
    ("q_per_kv", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vit_embed", "fsdp"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_patch", None),
    ("vit_tokens", None),
    ("qkv", None),
    ("norm", None),
    ("lora_rank", None),
    # Activations.
    ("act_batch", ("data", "fsdp")),
    ("act_tiles", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_kv_heads", "tensor"),
    ("act_vit_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; one size may be -1 (= the remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> P:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once; with `shape` and `mesh`, mesh axes that do not divide the
    dimension are dropped for it (it stays replicated along them).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis '{name}' has no rule in LOGICAL_AXIS_RULES")
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for mesh_axis in targets:
            if mesh_axis in used:
                continue
            if mesh is not None and shape is not None:
                size = math.prod(mesh.shape[a] for a in chosen + [mesh_axis])
                if shape[i] % size:
                    continue
            chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The NamedSharding of one Variable from its `axes` metadata (replicated without axes)."""
    axes = getattr(variable, "axes", None)
    shape = variable.get_value().shape
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh) if axes is not None else P())


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings for a (possibly abstract) state: a prefix tree of its Variables."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def sharded_abstract_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """The state with every value a ShapeDtypeStruct carrying its mesh sharding.

    This is the input of ahead-of-time compilation and the target of sharded restores.
    """
    def to_struct(variable):
        value = variable.get_value()
        return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=variable_sharding(variable, mesh)))
    return jax.tree.map(to_struct, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
