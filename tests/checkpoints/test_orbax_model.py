"""Model checkpoints: save, load into either layout and dtype, and clear errors."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.checkpoints.layout import find_checkpoint, tokenizer_path
from llada_jax.checkpoints.orbax_model import load_model, save_model
from llada_jax.errors import CheckpointNotFoundError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run"))
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(n_kv_heads=2), rngs=nnx.Rngs(3))
    save_model(model, run, step=7)
    return model, run


IDS = jnp.asarray([[1, 2, 3, 511, 511, 4]])


def test_roundtrip_same_logits(saved):
    model, run = saved
    loaded = load_model(run)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded(IDS), model(IDS))
    assert find_checkpoint(run) == (os.path.abspath(run), 7)
    # the step directory and the checkpoints directory name the same checkpoint
    np.testing.assert_array_equal(load_model(os.path.join(run, "checkpoints", "7"))(IDS), model(IDS))
    np.testing.assert_array_equal(load_model(os.path.join(run, "checkpoints"))(IDS), model(IDS))


def test_load_into_the_other_layout(saved):
    model, run = saved
    unrolled = load_model(run, scan_layers=False)
    assert isinstance(unrolled.blocks, nnx.List) and len(unrolled.blocks) == 2
    np.testing.assert_allclose(unrolled(IDS), model(IDS), rtol=1e-5, atol=1e-5)
    other = os.path.join(os.path.dirname(run), "unrolled_run")
    save_model(unrolled, other)
    rescanned = load_model(other, scan_layers=True)
    np.testing.assert_array_equal(rescanned.blocks.q_proj[...], model.blocks.q_proj[...])


def test_load_with_bf16_params(saved):
    model, run = saved
    loaded = load_model(run, dtype="bfloat16", param_dtype="bfloat16")
    assert loaded.blocks.ff_proj[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded.wte[...], model.wte[...].astype(jnp.bfloat16))


def test_missing_and_unfinished_checkpoints_are_clear_errors(tmp_path, saved):
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(CheckpointNotFoundError, match="no 'checkpoints' directory"):
        load_model(str(tmp_path))
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(CheckpointNotFoundError, match="holds no finished checkpoint step"):
        load_model(str(tmp_path / "empty"))
    assert tokenizer_path(saved[1]) is None
