"""Logical-axis sharding: names on arrays, a rules table from config, and the device mesh.

Every parameter carries its logical axis names (e.g. ("embed", "mlp")) in Flax's `out_sharding` variable
metadata, which `nnx.vmap(transform_metadata={nnx.PARTITION_NAME: "layers"})` extends with the stacked
"layers" axis. Large activations are constrained by logical names (`constrain(x, ("batch", "length",
"embed"))`). A rules table (config.mesh.logical_axis_rules) maps each logical name to mesh axes; Flax
resolves names through it (`flax.linen.logical_to_mesh_axes`: earlier rules take precedence and a mesh axis
shards at most one dimension of an array) and holds the active table (`nnx.logical_axis_rules`).

What Flax does not do, and this module adds before handing the rules to Flax, is fit each rule to the
mesh and the array: a mesh axis absent from the mesh or of size 1 is dropped, and a dimension is sharded
only over the mesh axes whose product divides it (8 kv heads over a tensor axis of 16 stay replicated),
so one rules table serves every mesh and model size. Without an active mesh the constraints are no-ops,
so the model runs unchanged on one device.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen
from jax.sharding import NamedSharding, PartitionSpec

from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES
from llada_jax.errors import MeshError

Rules = Sequence[tuple[str, Any]]
MESH_AXES = ("data", "fsdp", "expert", "tensor")


def current_rules() -> Rules:
    """The rules table set with `nnx.logical_axis_rules(...)`, else DEFAULT_LOGICAL_AXIS_RULES."""
    return linen.get_logical_axis_rules() or DEFAULT_LOGICAL_AXIS_RULES


def as_tuple(axes) -> tuple[str, ...]:
    """A rule's or a PartitionSpec entry's mesh axes as a tuple (None: none)."""
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def _fit(axes, mesh_shape: dict[str, int] | None, size: int | None):
    """One rule's mesh axes as Flax takes them (None, a name or a tuple of names). With `mesh_shape`, axes
    missing from the mesh or of size 1 are dropped; with `size` too, trailing axes are dropped until the
    product of the rest divides the dimension."""
    axes = list(as_tuple(axes))
    if mesh_shape is not None:
        axes = [a for a in axes if mesh_shape.get(a, 1) > 1]
        if size is not None:
            while axes and size % math.prod(mesh_shape[a] for a in axes):
                axes.pop()
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules | None = None,
    mesh_shape: dict[str, int] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical dimension names to a PartitionSpec through `rules` (default: `current_rules()`).

    Each rule is first fitted to `mesh_shape` and, given the array's `shape`, to the size of the dimension
    it names (see `_fit`); Flax's `logical_to_mesh_axes` then assigns the fitted rules in table order,
    leaving a dimension replicated when its mesh axes already shard an earlier-ruled dimension. So a batch
    of 2 on a data=2 x fsdp=2 mesh takes only "data", and the embedding dimension of the same activation
    takes "fsdp". A logical name without a rule is an error (a typo would otherwise replicate silently).
    """
    logical_axes = tuple(logical_axes)
    rules = tuple(rules if rules is not None else current_rules())
    named = {name for name, _ in rules}
    missing = [name for name in logical_axes if name is not None and name not in named]
    if missing:
        raise ValueError(f"logical axis {missing[0]!r} has no rule; rules cover {sorted(named)}")
    size = {name: None if shape is None else shape[dim] for dim, name in enumerate(logical_axes)}
    fitted = tuple((name, _fit(axes, mesh_shape, size[name])) for name, axes in rules if name in size)
    return linen.logical_to_mesh_axes(logical_axes, fitted)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the active mesh (`jax.set_mesh`) and rules
    (`nnx.logical_axis_rules`, else the defaults); the identity when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, mesh_shape=dict(mesh.shape), shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_logical_axes(variable) -> tuple[str | None, ...]:
    """The logical axis names of an nnx.Variable (its `out_sharding` metadata; replicated when it has none)."""
    axes = variable.get_metadata().get("out_sharding")
    return tuple(axes) if axes is not None else (None,) * len(variable.shape)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for an nnx.State (abstract or concrete) from each variable's logical axes, fitted to
    the mesh and the variable's shape; anything that is not a Variable is replicated."""
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
    return math.prod(mesh.shape[a] for a in as_tuple(spec))


# ----------------------------------------------------------------------------------------------------
# The device mesh
# ----------------------------------------------------------------------------------------------------


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Resolve (data, fsdp, expert, tensor, dcn_data) sizes from config; one of them may be -1 (the rest). A
    config without an `expert` size (written before the axis existed) has expert 1."""
    sizes = {name: int(mesh_config[name]) if name in mesh_config else 1 for name in ("dcn_data",) + MESH_AXES}
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
    """The (data, fsdp, expert, tensor) mesh with Auto axis types. `dcn_data` > 1 builds a hybrid mesh whose data
    axis spans slices (TPU multi-slice) or processes (multi-node GPU), with ICI/NVLink axes inside each."""
    devices = list(devices if devices is not None else jax.devices())
    grid = device_grid(mesh_shape(mesh_config, len(devices)), devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def device_grid(sizes: dict[str, int], devices: Sequence[Any]) -> np.ndarray:
    """The devices laid out as a (dcn_data x data, fsdp, expert, tensor) array for resolved `sizes` (`mesh_shape`).

    With dcn_data > 1 the devices fall into dcn_data granules: slices when the devices name more than one
    `slice_index` (TPU multi-slice), else processes. The outer factor of the data axis runs over granules and
    the inner axes stay inside one granule, so only data-parallel gradient reductions cross the slow network.
    dcn_data must then equal the number of granules, each holding data x fsdp x tensor devices.
    """
    from jax.experimental import mesh_utils

    ici = tuple(sizes[name] for name in MESH_AXES)
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
        raise MeshError(f"mesh.dcn_data {dcn}: each of the {dcn} {unit} must hold data x fsdp x expert x tensor = {per} "
                        f"devices, but they hold {sorted(counts.values())}")
    return mesh_utils.create_hybrid_device_mesh(ici, (dcn,) + (1,) * (len(ici) - 1), devices, process_is_granule=not by_slice,
                                                allow_split_physical_axes=True)


def check_rules(rules: Rules) -> None:
    """Check a rules table: it maps every logical name the model uses (those of DEFAULT_LOGICAL_AXIS_RULES)
    to None, a mesh axis or a tuple of mesh axes. A name may appear more than once; as in Flax, the first
    of its entries whose mesh axes (fitted to the mesh and dimension) are still free in the array is used."""
    table = {}
    for entry in rules:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise MeshError(f"mesh.logical_axis_rules: expected (logical_name, mesh_axes) pairs, got {entry!r}")
        name, axes = entry
        axes = as_tuple(axes)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise MeshError(f"mesh.logical_axis_rules: {name!r} maps to unknown mesh axis {unknown[0]!r} "
                            f"(mesh axes: {', '.join(MESH_AXES)})")
        table[name] = axes
    missing = [name for name, _ in DEFAULT_LOGICAL_AXIS_RULES if name not in table]
    if missing:
        raise MeshError(f"mesh.logical_axis_rules: no rule for {', '.join(map(repr, missing))} "
                        f"(map a logical axis to None to replicate it)")


# ----------------------------------------------------------------------------------------------------
# Commands that run a model on a mesh (sample, inference, eval-likelihood, the lm-eval adapter)
# ----------------------------------------------------------------------------------------------------


def parse_mesh(text: str | None) -> dict[str, int]:
    """The mesh sizes of a `--mesh data=D,fsdp=F,expert=E,tensor=T` flag (any subset, in any order; at most one size -1,
    meaning the remaining devices). Axes not named are 1, except `data`, which takes the remaining devices when no
    size is -1: the default (no flag) puts every device on `data`."""
    sizes = {"dcn_data": 1, **{name: 1 for name in MESH_AXES}}
    given = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise MeshError(f"--mesh: expected data=D,fsdp=F,expert=E,tensor=T (sizes are integers, one may be -1), "
                            f"got {item!r}")
        if name in given:
            raise MeshError(f"--mesh: {name} is given twice")
        given[name] = int(value)
    sizes.update(given)
    if -1 not in given.values() and "data" not in given:
        sizes["data"] = -1
    return sizes


def check_model_fits(sizes: dict[str, int], config) -> None:
    """A tensor-parallel size must divide the attention heads and the MLP widths, an expert-parallel size the
    experts (resolved `sizes`)."""
    tensor, expert = sizes["tensor"], sizes.get("expert", 1)
    widths = [("attention heads", config.n_heads), ("MLP width (mlp_hidden_size)", config.mlp_hidden_size)]
    if config.is_moe:
        widths.append(("expert width (expert_hidden_size)", config.expert_hidden_size))
    for what, n in widths:
        if n % tensor:
            raise MeshError(f"mesh tensor={tensor} does not divide the model's {n} {what}")
    if expert > 1 and not config.is_moe:
        raise MeshError(f"mesh expert={expert}: the model has no experts (num_experts is 0); use data or fsdp")
    if config.is_moe and config.num_experts % expert:
        raise MeshError(f"mesh expert={expert} does not divide the model's {config.num_experts} experts "
                        f"(num_experts)")


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A jax.Array of `host`, the same numpy array on every process, laid out by `sharding` (each process places
    its own shards; works across processes)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fetch(array: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) jax.Array as numpy, on every process."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
