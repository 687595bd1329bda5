"""Fixtures of the checkpoint tests: exported tiny models and a good official-style HF directory."""

import pytest

from llada_jax import LLaDAConfig
from tests.checkpoints.hf_helpers import KINDS, jax_model, official_style_dir


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """kind -> (JAX model, HF directory written by save_pretrained in float32)."""
    out = {}
    for kind, spec in KINDS.items():
        model = jax_model(kind)
        path = str(tmp_path_factory.mktemp("hf") / kind)
        model.save_pretrained(path, max_shard_size=spec["shard"])
        out[kind] = (model, path)
    return out


@pytest.fixture()
def good_hf(tmp_path):
    path = str(tmp_path / "good")
    official_style_dir(path, LLaDAConfig.tiny(n_kv_heads=2), dtype="float32")
    return path
