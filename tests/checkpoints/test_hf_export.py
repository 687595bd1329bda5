"""Export to the official Hugging Face layout, loaded by this project's PyTorch modeling code and the official one."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from llada_jax.checkpoints import convert_from_hf, convert_to_hf, load_pretrained
from llada_jax.checkpoints.hf_keys import hf_state_dict
from llada_jax.checkpoints.safetensors_io import INDEX_FILE, TensorReader, parse_size
from llada_jax.errors import CheckpointNotFoundError
from tests.checkpoints.hf_helpers import (
    IDS,
    KINDS,
    MASK,
    OFFICIAL_MODEL_CONFIG_FIELDS,
    assert_nothing_written,
    hf_automodel,
    jax_model,
    perturb_qkv_biases,
    read_all,
    torch_logits,
)
from tests.torch_reference import llada_logits


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_automodel_logits_match_jax_and_the_reference(exports, kind):
    model, path = exports[kind]
    hf = hf_automodel(path, dtype=torch.float32)
    assert type(hf).__name__ == "LLaDAModelLM"
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert set(hf.state_dict()) == set(hf_state_dict(model)), "parameter names are not the official ones"

    ours = torch_logits(hf, IDS)
    np.testing.assert_allclose(ours, np.asarray(model(jnp.asarray(IDS))), rtol=1e-4, atol=1e-4)
    weights = read_all(path)
    reference = llada_logits(weights, cfg, IDS)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)

    # attention_mask: padded keys ignored, positions counted over real tokens (as in JAX and the reference)
    masked = torch_logits(hf, IDS, MASK)
    np.testing.assert_allclose(masked, np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK))), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(masked, llada_logits(weights, cfg, IDS, MASK), rtol=1e-4, atol=1e-4)
    unpadded = torch_logits(hf, IDS[1:, 3:])
    np.testing.assert_allclose(masked[1, 3:], unpadded[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(masked[1], ours[1], atol=1e-3)  # the mask does change the padded row


def test_config_json_has_the_official_fields(exports):
    model, path = exports["gqa"]
    cfg = json.load(open(os.path.join(path, "config.json")))
    missing = [f for f in OFFICIAL_MODEL_CONFIG_FIELDS if f not in cfg]
    assert not missing, f"config.json lacks official fields {missing}"
    expected = dict(
        model_type="llada", architectures=["LLaDAModelLM"], block_type="llama", activation_type="silu",
        layer_norm_type="rms", include_bias=False, include_qkv_bias=False, rope=True, alibi=False,
        attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0, weight_tying=False,
        d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=192, vocab_size=512,
        max_sequence_length=512, rope_theta=10000.0, rms_norm_eps=1e-5, mask_token_id=511, eos_token_id=510,
        pad_token_id=510, torch_dtype="float32", block_group_size=1, rope_full_precision=True,
        attention_type="bidirectional", shift_logits=False,  # this project's fields, always written
        auto_map={"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    )
    assert {k: cfg[k] for k in expected} == expected
    for f in ("configuration_llada.py", "modeling_llada.py"):
        assert os.path.isfile(os.path.join(path, f))


def test_sharded_index(exports):
    model, path = exports["gqa"]
    index = json.load(open(os.path.join(path, INDEX_FILE)))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not os.path.exists(os.path.join(path, "model.safetensors"))
    assert sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) == files
    assert set(index["weight_map"]) == set(hf_state_dict(model))
    limit, total = parse_size("100KB"), 0
    for f in files:
        tensors = load_file(os.path.join(path, f))  # the safetensors package reads every shard
        assert {k for k, v in index["weight_map"].items() if v == f} == set(tensors)
        size = sum(t.nbytes for t in tensors.values())
        assert size <= limit or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    expected = hf_state_dict(model)
    for f in files:
        for k, v in load_file(os.path.join(path, f)).items():
            np.testing.assert_array_equal(v, expected[k])


def test_bf16_export_and_model_extras(exports, tmp_path):
    model, _ = exports["gqa"]
    path = str(tmp_path / "bf16")
    model.save_pretrained(path, dtype="bfloat16")
    assert json.load(open(os.path.join(path, "config.json")))["torch_dtype"] == "bfloat16"
    reader = TensorReader(path)
    assert {t.dtype for t in reader.tensors.values()} == {"BF16"}
    for k, v in hf_state_dict(model).items():
        np.testing.assert_array_equal(reader.read(k), v.astype(jnp.bfloat16))
    hf = hf_automodel(path, dtype="auto")  # the stored bfloat16
    assert hf.dtype == torch.bfloat16
    assert hf(torch.from_numpy(IDS)).logits.dtype == torch.bfloat16
    hf32 = hf_automodel(path, dtype=torch.float32)
    jax32 = load_pretrained(path, param_dtype="float32", dtype="float32")
    np.testing.assert_allclose(torch_logits(hf32, IDS), np.asarray(jax32(jnp.asarray(IDS))), rtol=1e-4, atol=1e-4)

    # hidden states, tuple outputs, gradient checkpointing
    out = hf32(torch.from_numpy(IDS), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layers + 1
    assert isinstance(hf32(torch.from_numpy(IDS), return_dict=False), tuple)
    hf32.train()
    (getattr(hf32, "activation_checkpointing_enable", None) or hf32.gradient_checkpointing_enable)()
    hf32(torch.from_numpy(IDS)).logits.sum().backward()
    assert hf32.model.transformer.blocks[0].q_proj.weight.grad is not None
    with pytest.raises(ValueError, match="labels"):
        hf32(torch.from_numpy(IDS), labels=torch.from_numpy(IDS))


def test_fresh_pytorch_model_uses_the_official_initialisation(exports):
    import transformers

    config = transformers.AutoConfig.from_pretrained(exports["gqa"][1], trust_remote_code=True)
    model_cls = type(hf_automodel(exports["gqa"][1]))
    torch.manual_seed(0)
    fresh = model_cls(config)
    w = fresh.model.transformer.blocks[1].ff_out.weight
    std = 192**-0.5 / (2.0 * 2) ** 0.5  # 1/sqrt(fan_in) / sqrt(2 (layer + 1))
    # a normal truncated at 3 sigma has a standard deviation of 0.986 sigma
    assert abs(w.std().item() - 0.986 * std) < 0.03 * std and w.abs().max() <= 3 * std + 1e-6
    assert torch.all(fresh.model.transformer.ln_f.weight == 1)


def test_bad_checkpoint_input_is_a_clear_error_and_writes_nothing(tmp_path, exports):
    out = str(tmp_path / "out")
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(CheckpointNotFoundError, match="holds no finished checkpoint step"):
        convert_to_hf(str(tmp_path / "empty"), out)
    assert_nothing_written(tmp_path, out)
    with pytest.raises(CheckpointNotFoundError, match="neither a Hugging Face model directory"):
        load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_pretrained(str(tmp_path / "nope"))
    # an existing output is never overwritten by accident
    existing = exports["tied"][1]
    with pytest.raises(FileExistsError, match="already exists"):
        convert_from_hf(exports["gqa"][1], existing)
    assert json.load(open(os.path.join(existing, "config.json")))["weight_tying"] is True


def test_a_failure_midway_leaves_nothing(tmp_path, exports, monkeypatch):
    from llada_jax.checkpoints import orbax_model

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    out = str(tmp_path / "out")
    monkeypatch.setattr(orbax_model.ParamReader, "read", boom)
    ckpt = str(tmp_path / "ckpt")
    convert_from_hf(exports["gqa"][1], ckpt)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_to_hf(ckpt, out)
    assert_nothing_written(tmp_path, out)


@pytest.mark.skipif(not os.environ.get("LLADA_OFFICIAL_CODE"),
                    reason="set LLADA_OFFICIAL_CODE to a directory holding the official configuration_llada.py "
                           "and modeling_llada.py (they need transformers 4.x)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_official_modeling_code_loads_the_export(exports, tmp_path, dtype):
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip(f"the official modeling code does not run under transformers {transformers.__version__} "
                    "(its model never calls post_init()); run this test with transformers 4.x")
    models = {kind: (model, KINDS[kind]["shard"]) for kind, (model, _) in exports.items()}
    # q/k/v biases (include_qkv_bias, which the official code reads): random values, not the initial zeros
    models["qkv_bias"] = (perturb_qkv_biases(jax_model("gqa", include_qkv_bias=True)), KINDS["gqa"]["shard"])
    for kind, (model, shard) in models.items():
        official = str(tmp_path / f"official_{kind}_{dtype}")  # a directory name no other test loaded code from
        if dtype == "float32" and kind in exports:
            shutil.copytree(exports[kind][1], official)
        else:
            model.save_pretrained(official, dtype=dtype, max_shard_size=shard)
        for f in ("configuration_llada.py", "modeling_llada.py"):
            shutil.copy(os.path.join(os.environ["LLADA_OFFICIAL_CODE"], f), official)
        hf = hf_automodel(official, dtype=torch.float32)
        # the official classes, not this project's (which has no LLaDALlamaBlock)
        assert type(hf.model.transformer.blocks[0]).__name__ == "LLaDALlamaBlock"
        # every exported weight is a parameter there (with weight_tying its tie_weights() also lists the
        # embedding as model.transformer.ff_out.weight)
        assert set(hf_state_dict(model)) <= set(hf.state_dict())
        expected = model if dtype == "float32" else load_pretrained(official, "float32", param_dtype="float32")
        np.testing.assert_allclose(torch_logits(hf, IDS), np.asarray(expected(jnp.asarray(IDS))),
                                   rtol=1e-4, atol=1e-4)
