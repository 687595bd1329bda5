"""The device mesh from config: axis sizes, the hybrid (dcn_data) layout, and clear errors."""

import dataclasses

import jax
import pytest

from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES, train_config
from llada_jax.sharding import MeshError, check_rules, device_grid, make_mesh, mesh_shape


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh_utils reads from a device: enough to lay out a multi-process / multi-slice mesh in one
    process (platform "cpu": no physical topology, devices are taken in the given order)."""

    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def mesh_config(data=1, fsdp=-1, tensor=1, dcn_data=1):
    c = train_config().mesh
    c.data, c.fsdp, c.tensor, c.dcn_data = data, fsdp, tensor, dcn_data
    return c


def test_mesh_shape_fills_the_free_axis_and_rejects_bad_sizes():
    assert mesh_shape(mesh_config(tensor=2), 8) == {"dcn_data": 1, "data": 1, "fsdp": 4, "tensor": 2}
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
    assert grid.shape == (4, 1, 2)  # (dcn_data x data, fsdp, tensor)
    assert {d.process_index for d in grid[:2].flat} == {0} and {d.process_index for d in grid[2:].flat} == {1}
    assert sorted(d.id for d in grid.flat) == list(range(8))


def test_hybrid_grid_uses_slices_when_devices_name_them():
    # TPU multi-slice: 2 slices of 4 devices, each slice spread over 2 hosts; granules are the slices
    devices = [FakeDevice(id=i, process_index=i // 2, slice_index=1 - i // 4) for i in range(8)]
    grid = device_grid(mesh_shape(mesh_config(fsdp=2, tensor=2, dcn_data=2), 8), devices)
    assert grid.shape == (2, 2, 2)
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
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_rules_table_errors():
    check_rules(DEFAULT_LOGICAL_AXIS_RULES)
    check_rules(train_config().mesh.logical_axis_rules)
    with pytest.raises(MeshError, match="no rule for 'norm'"):
        check_rules(DEFAULT_LOGICAL_AXIS_RULES[:-1])
    with pytest.raises(MeshError, match="'embed' maps to unknown mesh axis 'fsdpp'"):
        check_rules(tuple((n, "fsdpp" if n == "embed" else a) for n, a in DEFAULT_LOGICAL_AXIS_RULES))
    with pytest.raises(MeshError, match="expected \\(logical_name, mesh_axes\\) pairs"):
        check_rules(DEFAULT_LOGICAL_AXIS_RULES + (("batch",),))
