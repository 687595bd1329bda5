"""load_pretrained / load_model_and_tokenizer on either kind of saved model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from llada_jax import LLaDAForMaskedLM, sharding
from llada_jax.checkpoints import convert_from_hf, convert_to_hf, load_pretrained
from llada_jax.checkpoints.hf_keys import hf_state_dict
from llada_jax.checkpoints.orbax_model import save_model
from llada_jax.checkpoints.safetensors_io import (
    TensorReader,
)
from tests.checkpoints.hf_helpers import IDS, read_all


def test_load_pretrained_accepts_both_kinds(exports, tmp_path):
    model, path = exports["gqa"]
    expected = np.asarray(model(jnp.asarray(IDS)))
    from_hf = load_pretrained(path)
    assert from_hf.config == model.config
    np.testing.assert_array_equal(np.asarray(from_hf(jnp.asarray(IDS))), expected)
    ckpt = str(tmp_path / "ckpt")
    convert_from_hf(path, ckpt)
    for p in (ckpt, os.path.join(ckpt, "checkpoints"), os.path.join(ckpt, "checkpoints", "0")):
        np.testing.assert_array_equal(np.asarray(LLaDAForMaskedLM.from_pretrained(p)(jnp.asarray(IDS))), expected)
    unrolled = LLaDAForMaskedLM.from_pretrained(path, scan_layers=False)
    assert not unrolled.config.scan_layers
    np.testing.assert_allclose(np.asarray(unrolled(jnp.asarray(IDS))), expected, rtol=1e-5, atol=1e-5)
    bf16 = load_pretrained(path, "bfloat16", param_dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16" and bf16.wte[...].dtype == jnp.bfloat16
    # an unrolled (non-scanned) Orbax checkpoint exports too
    run = str(tmp_path / "unrolled_run")
    save_model(unrolled, run)
    convert_to_hf(run, str(tmp_path / "from_unrolled"))
    np.testing.assert_array_equal(load_file(str(tmp_path / "from_unrolled" / "model.safetensors"))[
        "model.transformer.blocks.1.k_proj.weight"], hf_state_dict(model)["model.transformer.blocks.1.k_proj.weight"])


def test_load_pretrained_shards_over_a_mesh(exports, tmp_path):
    model, path = exports["gqa"]
    mesh = jax.make_mesh((2, 2, 1, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    loaded = load_pretrained(path, mesh=mesh)
    spec = loaded.blocks.ff_proj[...].sharding.spec
    assert any(axis is not None for axis in spec), spec
    np.testing.assert_allclose(np.asarray(loaded(jnp.asarray(IDS))), np.asarray(model(jnp.asarray(IDS))),
                               rtol=1e-5, atol=1e-5)
    # a sharded model exports the same tensors
    back = str(tmp_path / "back")
    loaded.save_pretrained(back)
    for k, v in read_all(path).items():
        np.testing.assert_array_equal(TensorReader(back).read(k), v)
