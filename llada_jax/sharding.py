"""Logical-axis sharding: names on arrays, a rules table from config, and the device mesh.

Every parameter carries a `logical_axes` tuple in its metadata (e.g. ("embed", "mlp")) and large
activations are constrained with logical names (`constrain(x, ("batch", "length", "embed"))`). A rules
table (config.mesh.logical_axis_rules) maps each logical name to mesh axes; this module turns the two into
`PartitionSpec`s. Without an active mesh the constraints are no-ops, so the model runs unchanged on one
device.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES

Rules = Sequence[tuple[str, Any]]
MESH_AXES = ("data", "fsdp", "tensor")


class _RulesContext(threading.local):
    rules: Rules = DEFAULT_LOGICAL_AXIS_RULES


_context = _RulesContext()


@contextlib.contextmanager
def axis_rules(rules: Rules):
    """Use `rules` for activation constraints traced inside this context."""
    previous = _context.rules
    _context.rules = tuple((name, _as_tuple(axes)) for name, axes in rules)
    try:
        yield
    finally:
        _context.rules = previous


def current_rules() -> Rules:
    return _context.rules


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules | None = None,
    mesh_shape: dict[str, int] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical dimension names to a PartitionSpec.

    A mesh axis is used at most once per array (first dimension wins). With `mesh_shape`, axes missing
    from the mesh or of size 1 are dropped; with `shape` too, a dimension is sharded only over the mesh
    axes whose product divides it (e.g. 8 kv heads over a tensor axis of 16 stay replicated).
    """
    table = {name: _as_tuple(axes) for name, axes in (rules if rules is not None else current_rules())}
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        axes = [a for a in table[name] if a not in used]
        if mesh_shape is not None:
            axes = [a for a in axes if mesh_shape.get(a, 1) > 1]
            if shape is not None:
                while axes and shape[dim] % math.prod(mesh_shape[a] for a in axes):
                    axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def _active_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the active mesh (`jax.set_mesh`); else identity."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, mesh_shape=dict(mesh.shape), shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_logical_axes(variable) -> tuple[str | None, ...]:
    """The `logical_axes` metadata of an nnx.Variable (replicated when it has none)."""
    axes = variable.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * len(variable.shape)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for an nnx.State (abstract or concrete) from each variable's logical axes."""
    from flax import nnx

    mesh_shape = dict(mesh.shape)

    def one(v):
        if isinstance(v, nnx.Variable):
            spec = logical_to_spec(param_logical_axes(v), rules, mesh_shape, v.shape)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def batch_spec(rules: Rules, mesh: jax.sharding.Mesh, ndim: int = 2) -> PartitionSpec:
    """PartitionSpec of a [batch, ...] input array: the batch dimension over the data-parallel axes."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, dict(mesh.shape))


def data_parallel_size(rules: Rules, mesh: jax.sharding.Mesh) -> int:
    """Number of shards of the batch dimension (what the global batch must be divisible by)."""
    spec = batch_spec(rules, mesh)[0]
    return math.prod(mesh.shape[a] for a in _as_tuple(spec))



# ----------------------------------------------------------------------------------------------------
# The device mesh
# ----------------------------------------------------------------------------------------------------


class MeshError(ValueError):
    pass


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Resolve (data, fsdp, tensor, dcn_data) sizes from config; one of them may be -1 (the rest)."""
    sizes = {name: int(mesh_config[name]) for name in ("dcn_data",) + MESH_AXES}
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise MeshError(f"mesh sizes {sizes}: each must be a positive integer, and at most one may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % known:
            raise MeshError(f"mesh sizes {sizes}: the fixed axes ({known} devices) do not divide the "
                            f"{num_devices} devices")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {num_devices} are available")
    return sizes


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh with Auto axis types. `dcn_data` > 1 builds a hybrid mesh whose data
    axis spans slices (TPU multi-slice) or processes (multi-node GPU), with ICI/NVLink axes inside each."""
    devices = list(devices if devices is not None else jax.devices())
    grid = device_grid(mesh_shape(mesh_config, len(devices)), devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def device_grid(sizes: dict[str, int], devices: Sequence[Any]) -> np.ndarray:
    """The devices laid out as a (dcn_data x data, fsdp, tensor) array for resolved `sizes` (`mesh_shape`).

    With dcn_data > 1 the devices fall into dcn_data granules: slices when the devices name more than one
    `slice_index` (TPU multi-slice), else processes. The outer factor of the data axis runs over granules and
    the inner axes stay inside one granule, so only data-parallel gradient reductions cross the slow network.
    dcn_data must then equal the number of granules, each holding data x fsdp x tensor devices.
    """
    from jax.experimental import mesh_utils

    ici = (sizes["data"], sizes["fsdp"], sizes["tensor"])
    dcn = sizes["dcn_data"]
    if dcn == 1:
        return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    slices = [getattr(d, "slice_index", None) for d in devices]
    by_slice = None not in slices and len(set(slices)) > 1
    unit = "slices" if by_slice else "processes"
    counts: dict[int, int] = {}
    for d in devices:
        key = d.slice_index if by_slice else d.process_index
        counts[key] = counts.get(key, 0) + 1
    if len(counts) != dcn:
        raise MeshError(f"mesh.dcn_data {dcn} must be 1 or the number of {unit} ({len(counts)}): it is the "
                        f"data-parallel axis across {unit}")
    per = math.prod(ici)
    if any(n != per for n in counts.values()):
        raise MeshError(f"mesh.dcn_data {dcn}: each of the {dcn} {unit} must hold data x fsdp x tensor = {per} "
                        f"devices, but they hold {sorted(counts.values())}")
    return mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices, process_is_granule=not by_slice,
                                                allow_split_physical_axes=True)


def check_rules(rules: Rules) -> None:
    """Check a rules table: it maps every logical name the model uses (those of DEFAULT_LOGICAL_AXIS_RULES)
    to None, a mesh axis or a tuple of mesh axes."""
    table = {}
    for entry in rules:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise MeshError(f"mesh.logical_axis_rules: expected (logical_name, mesh_axes) pairs, got {entry!r}")
        name, axes = entry
        axes = _as_tuple(axes)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise MeshError(f"mesh.logical_axis_rules: {name!r} maps to unknown mesh axis {unknown[0]!r} "
                            f"(mesh axes: {', '.join(MESH_AXES)})")
        table[name] = axes
    missing = [name for name, _ in DEFAULT_LOGICAL_AXIS_RULES if name not in table]
    if missing:
        raise MeshError(f"mesh.logical_axis_rules: no rule for {', '.join(map(repr, missing))} "
                        f"(map a logical axis to None to replicate it)")
