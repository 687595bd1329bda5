"""The model types of converted autoregressive checkpoints through the Hugging Face layout: q/k/v biases
(`include_qkv_bias`), causal attention (`attention_type="causal"`) and shifted logits (`shift_logits`), each
alone and all together, and block-causal attention (`attention_type="block_causal"` with `block_size`, block
diffusion). A tiny JAX model (biases set to random values) is exported, loaded by this project's PyTorch
modeling code and compared with the JAX logits and with the independent PyTorch reference, then imported back."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.checkpoints import convert_from_hf, convert_to_hf, load_pretrained
from llada_jax.checkpoints.hf_keys import hf_state_dict
from tests.checkpoints.hf_helpers import (
    IDS,
    MASK,
    hf_automodel,
    perturb_qkv_biases,
    read_all,
    torch_logits,
)
from tests.torch_reference import llada_logits

TYPES = {
    "qkv_bias": {"include_qkv_bias": True},
    "causal": {"attention_type": "causal"},
    "shift": {"shift_logits": True},
    "all": {"include_qkv_bias": True, "attention_type": "causal", "shift_logits": True},
    # blocks of 3 from index 0: the left padding of MASK (3 tokens) keeps the padded row's blocks
    "block_causal": {"attention_type": "block_causal", "block_size": 3},
}
PLAIN = {"include_qkv_bias": False, "attention_type": "bidirectional", "shift_logits": False}
TOL = {"rtol": 1e-4, "atol": 1e-4}


def typed_model(fields, seed=0):
    """A tiny fp32 model with grouped-query attention; biases are zero-initialised and drawn no random
    numbers, so the PLAIN model of the same seed has the same other weights."""
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(n_kv_heads=2, **fields), rngs=nnx.Rngs(seed))
    return perturb_qkv_biases(model) if fields.get("include_qkv_bias") else model


@pytest.fixture(scope="module")
def typed_exports(tmp_path_factory):
    """kind -> (JAX model, HF directory written by save_pretrained, the model loaded by AutoModel)."""
    out = {}
    for kind, fields in TYPES.items():
        model = typed_model(fields)
        path = str(tmp_path_factory.mktemp("types") / kind)
        model.save_pretrained(path, max_shard_size="100KB" if kind == "all" else "5GB")
        out[kind] = (model, path, hf_automodel(path, dtype=torch.float32))
    return out


def config_json(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def jax_logits(model, ids, mask=None):
    return np.asarray(model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_config_json_has_the_model_type_fields(typed_exports, kind):
    import transformers

    _, path, hf = typed_exports[kind]
    cfg = config_json(path)
    expected = {**PLAIN, **TYPES[kind]}
    assert {k: cfg[k] for k in expected} == expected
    assert ("block_size" in cfg) == (kind == "block_causal")  # written for a block_causal model only
    auto = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert {k: getattr(auto, k) for k in expected} == expected
    assert auto.block_size == TYPES[kind].get("block_size")
    biases = {k for k in hf.state_dict() if k.endswith("_proj.bias")}
    assert len(biases) == (3 * 2 if TYPES[kind].get("include_qkv_bias") else 0), sorted(biases)


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_automodel_logits_match_jax_and_the_reference(typed_exports, kind):
    model, path, hf = typed_exports[kind]
    assert set(hf.state_dict()) == set(hf_state_dict(model)), "parameter names are not the official ones"
    cfg = config_json(path)
    weights = read_all(path)

    ours = torch_logits(hf, IDS)
    np.testing.assert_allclose(ours, jax_logits(model, IDS), **TOL)
    np.testing.assert_allclose(ours, llada_logits(weights, cfg, IDS), **TOL)
    # a left-padded row: padded keys ignored, positions over real tokens (a causal mask counts indices)
    masked = torch_logits(hf, IDS, MASK)
    np.testing.assert_allclose(masked, jax_logits(model, IDS, MASK), **TOL)
    np.testing.assert_allclose(masked, llada_logits(weights, cfg, IDS, MASK), **TOL)
    unpadded = torch_logits(hf, IDS[1:, 3:])
    if model.config.shift_logits:  # the first real token reads the output at a padded position
        np.testing.assert_allclose(masked[1, 4:], unpadded[0, 1:], **TOL)
    else:
        np.testing.assert_allclose(masked[1, 3:], unpadded[0], **TOL)

    # the field changes the logits (so the matches above say something about it)
    plain = typed_model(PLAIN)
    assert not np.allclose(jax_logits(plain, IDS), ours, atol=1e-3)
    assert not np.allclose(jax_logits(plain, IDS, MASK), masked, atol=1e-3)


def test_causal_attention_sees_no_later_token(typed_exports):
    _, _, hf = typed_exports["causal"]
    full = torch_logits(hf, IDS)
    np.testing.assert_allclose(torch_logits(hf, IDS[:, :5]), full[:, :5], **TOL)
    changed = IDS.copy()
    changed[:, 5] = 100
    after = torch_logits(hf, changed)
    np.testing.assert_allclose(after[:, :5], full[:, :5], **TOL)
    assert not np.allclose(after[:, 5:], full[:, 5:], atol=1e-3)


def test_block_causal_attention_sees_its_block_and_the_blocks_before(typed_exports):
    model, path, hf = typed_exports["block_causal"]
    full = torch_logits(hf, IDS)
    np.testing.assert_allclose(torch_logits(hf, IDS[:, :6]), full[:, :6], **TOL)  # blocks 0 and 1 alone
    changed = IDS.copy()
    changed[:, 4] = 100  # in block 1 (indices 3..5): seen by its whole block and by block 2, not by block 0
    after = torch_logits(hf, changed)
    np.testing.assert_allclose(after[:, :3], full[:, :3], **TOL)
    assert not np.allclose(after[:, 3], full[:, 3], atol=1e-3)
    assert not np.allclose(after[:, 6:], full[:, 6:], atol=1e-3)
    # blocks laid from an anchor (a block_anchor kwarg, one per row): the same logits as JAX and the reference
    anchors = np.array([4, 2])
    with torch.no_grad():
        out = hf(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK),
                 block_anchor=torch.from_numpy(anchors)).logits.float().numpy()
    want = np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK), block_anchor=jnp.asarray(anchors)))
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(out, llada_logits(read_all(path), config_json(path), IDS, MASK, block_anchor=anchors),
                               **TOL)
    assert not np.allclose(out, torch_logits(hf, IDS, MASK), atol=1e-3)


def test_shifted_logits_are_the_plain_logits_one_position_later(typed_exports):
    _, _, hf = typed_exports["shift"]
    plain = typed_model(PLAIN)  # the same weights without the shift
    for mask in (None, MASK):
        shifted, unshifted = torch_logits(hf, IDS, mask), jax_logits(plain, IDS, mask)
        real = np.ones_like(IDS) if mask is None else mask
        for row in range(IDS.shape[0]):  # a row's first real token keeps its own logits (left padding before it)
            first = int(np.argmax(real[row]))
            np.testing.assert_allclose(shifted[row, first + 1:], unshifted[row, first:-1], **TOL)
            np.testing.assert_allclose(shifted[row, first], unshifted[row, first], **TOL)


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_import_of_the_export_is_the_same_model(typed_exports, tmp_path, kind):
    model, path, _ = typed_exports[kind]
    loaded = load_pretrained(path)
    fields = (*PLAIN, "block_size", "n_kv_heads", "d_model", "vocab_size")
    assert {k: getattr(loaded.config, k) for k in fields} == {k: getattr(model.config, k) for k in fields}
    np.testing.assert_allclose(jax_logits(loaded, IDS, MASK), jax_logits(model, IDS, MASK), rtol=1e-5, atol=1e-5)

    # HF -> Orbax -> HF writes the same config.json and weights
    ckpt, again = str(tmp_path / "ckpt"), str(tmp_path / f"again_{kind}")
    convert_from_hf(path, ckpt)
    convert_to_hf(ckpt, again)
    assert config_json(again) == config_json(path)
    first, second = read_all(path), read_all(again)
    assert set(first) == set(second)
    for k in first:
        np.testing.assert_array_equal(second[k], first[k])


def test_block_size_maps_both_ways_and_only_for_block_causal():
    from llada_jax.checkpoints.hf_config import from_hf_config, to_hf_config
    from llada_jax.errors import HFConfigError

    blocky = LLaDAConfig.tiny(attention_type="block_causal", block_size=4)
    exported = to_hf_config(blocky, "float32")
    assert (exported["attention_type"], exported["block_size"]) == ("block_causal", 4)
    assert from_hf_config(exported) == blocky
    plain = to_hf_config(LLaDAConfig.tiny(), "float32")
    assert "block_size" not in plain and from_hf_config(plain).block_size is None  # absent: None
    # onto a base: a change of type writes the field, the same type keeps the base's
    assert to_hf_config(blocky, "float32", base=plain)["block_size"] == 4
    assert to_hf_config(blocky, "float32", base=exported) == exported
    for bad in (dict(exported, block_size=0), dict(exported, block_size="4"), dict(plain, block_size=4),
                {k: v for k, v in exported.items() if k != "block_size"}):
        with pytest.raises(HFConfigError, match="block_size"):
            from_hf_config(bad)
