"""The device mesh from config (axis sizes, the hybrid dcn_data layout, clear errors) and the PartitionSpecs
that the logical-axis rules give the tiny model's parameters and activations."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import P

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, sharding
from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES, train_config
from llada_jax.sharding import (
    MeshError,
    check_rules,
    device_grid,
    make_mesh,
    mesh_shape,
)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh_utils reads from a device: enough to lay out a multi-process / multi-slice mesh in one
    process (platform "cpu": no physical topology, devices are taken in the given order)."""

    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def mesh_config(data=1, fsdp=-1, tensor=1, dcn_data=1, expert=1):
    c = train_config().mesh
    c.data, c.fsdp, c.tensor, c.dcn_data, c.expert = data, fsdp, tensor, dcn_data, expert
    return c


def test_mesh_shape_fills_the_free_axis_and_rejects_bad_sizes():
    assert mesh_shape(mesh_config(tensor=2), 8) == {"dcn_data": 1, "data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    assert mesh_shape(mesh_config(expert=4), 8) == {"dcn_data": 1, "data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    assert mesh_shape(mesh_config(dcn_data=2, tensor=2), 8)["fsdp"] == 2
    with pytest.raises(MeshError, match="at most one may be -1"):
        mesh_shape(mesh_config(data=-1), 8)
    with pytest.raises(MeshError, match="do not divide the 8 devices"):
        mesh_shape(mesh_config(tensor=3), 8)
    with pytest.raises(MeshError, match="needs 4 devices, but 8 are available"):
        mesh_shape(mesh_config(fsdp=2, tensor=2), 8)


def test_hybrid_grid_puts_each_process_in_its_own_data_replica():
    # 2 processes x 4 devices, listed interleaved: the outer data factor must still run over processes
    devices = [FakeDevice(id=i, process_index=i % 2) for i in range(8)]
    grid = device_grid(mesh_shape(mesh_config(data=2, tensor=2, dcn_data=2), 8), devices)
    assert grid.shape == (4, 1, 1, 2)  # (dcn_data x data, fsdp, expert, tensor)
    assert {d.process_index for d in grid[:2].flat} == {0} and {d.process_index for d in grid[2:].flat} == {1}
    assert sorted(d.id for d in grid.flat) == list(range(8))


def test_hybrid_grid_uses_slices_when_devices_name_them():
    # TPU multi-slice: 2 slices of 4 devices, each slice spread over 2 hosts; granules are the slices
    devices = [FakeDevice(id=i, process_index=i // 2, slice_index=1 - i // 4) for i in range(8)]
    grid = device_grid(mesh_shape(mesh_config(fsdp=2, tensor=2, dcn_data=2), 8), devices)
    assert grid.shape == (2, 2, 1, 2)
    assert {d.slice_index for d in grid[0].flat} == {0} and {d.slice_index for d in grid[1].flat} == {1}


def test_dcn_data_must_match_the_processes():
    devices = [FakeDevice(id=i, process_index=i // 2) for i in range(8)]  # 4 processes
    with pytest.raises(MeshError, match=r"mesh.dcn_data 2 must be 1 or the number of processes \(4\)"):
        device_grid(mesh_shape(mesh_config(dcn_data=2), 8), devices)
    uneven = [FakeDevice(id=i, process_index=int(i >= 6)) for i in range(8)]  # 6 + 2 devices
    with pytest.raises(MeshError, match=r"each of the 2 processes must hold .* 4 devices, but they hold \[2, 6\]"):
        device_grid(mesh_shape(mesh_config(dcn_data=2), 8), uneven)
    # one process: dcn_data > 1 is an error, not silently folded into the data axis
    with pytest.raises(MeshError, match=r"number of processes \(1\)"):
        make_mesh(mesh_config(dcn_data=2), jax.devices())


def test_make_mesh_axes():
    mesh = make_mesh(mesh_config(data=2, tensor=2), jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 4


def test_rules_table_errors():
    check_rules(DEFAULT_LOGICAL_AXIS_RULES)
    check_rules(train_config().mesh.logical_axis_rules)
    with pytest.raises(MeshError, match="no rule for 'norm'"):
        check_rules(tuple(rule for rule in DEFAULT_LOGICAL_AXIS_RULES if rule[0] != "norm"))
    with pytest.raises(MeshError, match="'embed' maps to unknown mesh axis 'fsdpp'"):
        check_rules(tuple((n, "fsdpp" if n == "embed" else a) for n, a in DEFAULT_LOGICAL_AXIS_RULES))
    with pytest.raises(MeshError, match="expected \\(logical_name, mesh_axes\\) pairs"):
        check_rules(DEFAULT_LOGICAL_AXIS_RULES + (("batch",),))


# --- which array gets which PartitionSpec (default rules, a data=2 x fsdp=2 x tensor=2 mesh) ----------------


def mesh_222():
    return jax.make_mesh((2, 2, 1, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def tiny_param_specs(**overrides) -> dict[str, P]:
    """{"blocks.q_proj": PartitionSpec, ...} of the tiny model's parameters, as the trainer shards them."""
    model = nnx.eval_shape(lambda: LLaDAForMaskedLM(LLaDAConfig.tiny(**overrides), rngs=nnx.Rngs(0)))
    shardings = sharding.state_shardings(nnx.state(model, nnx.Param), mesh_222(), DEFAULT_LOGICAL_AXIS_RULES)
    return {".".join(map(str, path)): s.get_value().spec for path, s in nnx.to_flat_state(shardings)}


def constraint_specs(fn, *args) -> set[tuple[tuple[int, ...], P]]:
    """(shape, PartitionSpec) of every sharding constraint in fn's jaxpr (scan and remat bodies included),
    traced under the 2 x 2 x 2 mesh."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                found.add((tuple(eqn.invars[0].aval.shape), eqn.params["sharding"].spec))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    with jax.set_mesh(mesh_222()):
        walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_parameter_partition_specs():
    # layers and norm gains replicated; embed over fsdp; heads, mlp and vocab over tensor
    specs = tiny_param_specs()
    assert specs == {
        "wte": P("tensor", "fsdp"), "ff_out": P("fsdp", "tensor"), "ln_f": P(None),
        "blocks.attn_norm": P(None, None), "blocks.ff_norm": P(None, None),
        "blocks.q_proj": P(None, "fsdp", "tensor", None), "blocks.k_proj": P(None, "fsdp", "tensor", None),
        "blocks.v_proj": P(None, "fsdp", "tensor", None), "blocks.attn_out": P(None, "tensor", None, "fsdp"),
        "blocks.ff_proj": P(None, "fsdp", "tensor"), "blocks.up_proj": P(None, "fsdp", "tensor"),
        "blocks.ff_out": P(None, "tensor", "fsdp"),
    }
    # one kv head does not divide over tensor=2: it stays replicated, the rest of the array is sharded as before
    mqa = tiny_param_specs(n_kv_heads=1)
    assert mqa["blocks.k_proj"] == mqa["blocks.v_proj"] == P(None, "fsdp", None, None)
    assert {k: v for k, v in mqa.items() if k not in ("blocks.k_proj", "blocks.v_proj")} == {
        k: v for k, v in specs.items() if k not in ("blocks.k_proj", "blocks.v_proj")}
    # unscanned blocks: the same specs without the leading layers axis
    unrolled = tiny_param_specs(scan_layers=False)
    assert unrolled["blocks.0.q_proj"] == unrolled["blocks.1.q_proj"] == P("fsdp", "tensor", None)
    assert unrolled["blocks.1.attn_out"] == P("tensor", None, "fsdp") and unrolled["blocks.0.ff_norm"] == P(None)


def test_activation_partition_specs():
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))
    ids = jnp.zeros((4, 8), jnp.int32)
    # batch 4 splits over data x fsdp, so the embedding dimension (fsdp) stays whole
    assert constraint_specs(model, ids) == {
        ((4, 8, 64), P(("data", "fsdp"), None, None)),  # residual stream
        ((4, 8, 4, 16), P(("data", "fsdp"), None, "tensor", None)),  # q, k, v
        ((4, 8, 192), P(("data", "fsdp"), None, "tensor")),  # MLP hidden
        ((4, 8, 512), P(("data", "fsdp"), None, "tensor")),  # logits
    }
    # batch 2 divides only the data axis: fsdp is then free for the embedding dimension; one kv head is
    # replicated over tensor=2
    mqa = LLaDAForMaskedLM(LLaDAConfig.tiny(n_kv_heads=1), rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 8), jnp.int32)
    assert constraint_specs(mqa, ids) == {
        ((2, 8, 64), P("data", None, "fsdp")),
        ((2, 8, 4, 16), P("data", None, "tensor", None)),
        ((2, 8, 1, 16), P("data", None, None, None)),
        ((2, 8, 192), P("data", None, "tensor")),
        ((2, 8, 512), P("data", None, "tensor")),
    }
    # the KV-cache window: the cache update keeps the cache's layout
    _, cache = mqa.hidden_states_and_kv(ids)
    window = constraint_specs(lambda w, c: mqa.hidden_states_from_kv(w, 4, c), ids[:, :4], cache)
    assert window == {
        ((2, 4, 64), P("data", None, "fsdp")),
        ((2, 4, 4, 16), P("data", None, "tensor", None)),
        ((2, 4, 1, 16), P("data", None, None, None)),
        ((2, 8, 1, 16), P("data", None, None, None)),
        ((2, 4, 192), P("data", None, "tensor")),
    }


def test_rules_come_from_the_active_table_and_fit_the_mesh():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    # the active table (nnx.logical_axis_rules) replaces the defaults, for constraints traced inside it
    no_mlp = tuple((n, None if n == "mlp" else a) for n, a in DEFAULT_LOGICAL_AXIS_RULES)
    assert sharding.logical_to_spec(("batch", "mlp"), mesh_shape=mesh, shape=(4, 8)) == P(("data", "fsdp"), "tensor")
    with nnx.logical_axis_rules(no_mlp):
        assert sharding.current_rules() == no_mlp
        assert sharding.logical_to_spec(("batch", "mlp"), mesh_shape=mesh, shape=(4, 8)) == P(("data", "fsdp"), None)
    assert sharding.current_rules() == DEFAULT_LOGICAL_AXIS_RULES
    # mesh axes of size 1 or missing are dropped; trailing axes go until the rest divide the dimension
    rules = (("batch", ("data", "fsdp", "tensor")), ("embed", "fsdp"))
    assert sharding.logical_to_spec(("batch", "embed"), rules, {"data": 2, "fsdp": 1}, (6, 8)) == P("data", None)
    assert sharding.logical_to_spec(("batch", "embed"), rules, mesh, (4, 8)) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", "embed"), rules, mesh, (8, 8)) == P(("data", "fsdp", "tensor"), None)
    # a name may have several rules: the first whose mesh axes are still free in the array is used
    fallback = rules + (("embed", "tensor"),)
    assert sharding.logical_to_spec(("batch", "embed"), fallback, mesh, (4, 8)) == P(("data", "fsdp"), "tensor")
    assert sharding.logical_to_spec(("batch", "embed"), fallback, mesh, (2, 8)) == P("data", "fsdp")
    with pytest.raises(ValueError, match="logical axis 'embd' has no rule"):
        sharding.logical_to_spec(("batch", "embd"), rules)
