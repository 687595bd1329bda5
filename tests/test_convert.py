"""Hugging Face interop: export, this project's PyTorch modeling code, import, round trips, bad input, CLI."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

# trust_remote_code copies the modeling files into the HF modules cache: keep it out of the home directory.
_MODULES_CACHE = tempfile.mkdtemp(prefix="hf_modules_")
atexit.register(shutil.rmtree, _MODULES_CACHE, ignore_errors=True)
os.environ["HF_MODULES_CACHE"] = _MODULES_CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, sharding  # noqa: E402
from llada_jax.checkpoints import convert_from_hf, convert_to_hf, load_pretrained  # noqa: E402
from llada_jax.checkpoints.hf_config import to_hf_config  # noqa: E402
from llada_jax.errors import CheckpointNotFoundError, HFConfigError, SafetensorsError, WeightsError  # noqa: E402
from llada_jax.checkpoints.hf_keys import hf_state_dict  # noqa: E402
from llada_jax.checkpoints.safetensors_io import (INDEX_FILE, ShardedWriter, TensorReader,  # noqa: E402
                                              parse_size)
from llada_jax.checkpoints.layout import tokenizer_path  # noqa: E402
from llada_jax.checkpoints.orbax_model import save_model  # noqa: E402
from tests.torch_reference import llada_logits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.array([[509, 17, 42, 511, 511, 3, 200, 7, 9], [1, 2, 3, 4, 511, 6, 7, 8, 9]])
# The second row is left-padded by three tokens.
MASK = np.array([[1] * 9, [0, 0, 0, 1, 1, 1, 1, 1, 1]])

# Every field the official configuration class reads (its ModelConfig dataclass): a config.json missing one
# of them gets the official OLMo/GPT-2 default instead (rope off, tied weights, a sequential block, ...).
OFFICIAL_MODEL_CONFIG_FIELDS = (
    "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_ratio", "mlp_hidden_size", "activation_type",
    "block_type", "block_group_size", "alibi", "alibi_bias_max", "rope", "rope_full_precision", "flash_attention",
    "attention_dropout", "multi_query_attention", "attention_layer_norm", "residual_dropout", "embedding_dropout",
    "input_emb_norm", "layer_norm_type", "layer_norm_with_affine", "rms_norm_eps",
    "attention_layer_norm_with_affine", "max_sequence_length", "rope_theta", "include_qkv_bias", "include_bias",
    "bias_for_layer_norm", "scale_logits", "vocab_size", "embedding_size", "weight_tying", "eos_token_id",
    "pad_token_id", "mask_token_id", "init_device", "init_fn", "init_std", "init_cutoff_factor", "precision",
)

# config.json of GSAI-ML/LLaDA-8B-Base as published.
LLADA_8B_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}

KINDS = {
    # grouped-query attention, untied output head, sharded files
    "gqa": dict(config=dict(n_kv_heads=2), shard="100KB"),
    # multi-query attention, tied embedding / head, one file
    "tied": dict(config=dict(n_kv_heads=1, weight_tying=True), shard="5GB"),
}


def jax_model(kind, seed=0, **overrides):
    return LLaDAForMaskedLM(LLaDAConfig.tiny(**KINDS[kind]["config"], **overrides), rngs=nnx.Rngs(seed))


def hf_automodel(path, dtype=None):
    import transformers

    kwargs = {}
    if dtype is not None:  # transformers 5 calls it `dtype`, 4.x `torch_dtype`
        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    return transformers.AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask))
    return out.logits.float().numpy()


def read_all(path):
    reader = TensorReader(path)
    return {k: reader.read(k) for k in reader.tensors}


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


def official_style_dir(path, config, dtype="bfloat16", shard="5GB", seed=0):
    """An HF directory shaped like GSAI-ML/LLaDA-8B-Base (its config.json fields, no bos_token_id), with
    random weights written by the `safetensors` package (not by this project's writer)."""
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(seed))
    hf = to_hf_config(config, dtype)
    hf.pop("bos_token_id")
    hf.pop("tie_word_embeddings")
    hf["transformers_version"] = "4.46.3"
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    state = {k: np.ascontiguousarray(v.astype(jnp.dtype(dtype))) for k, v in hf_state_dict(model).items()}
    if shard == "5GB":
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:  # two shards and an index, split by layer
        first = {k: v for k, v in state.items() if ".blocks.0." in k or "wte" in k}
        second = {k: v for k, v in state.items() if k not in first}
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for name, part in zip(names, (first, second)):
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map = {k: names[0] if k in first else names[1] for k in state}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": sum(v.nbytes for v in state.values())}, "weight_map": weight_map}, f)
    return model, state


# --- export + this project's PyTorch modeling code ----------------------------------------------------------


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


def test_the_official_8b_config_maps_both_ways():
    from llada_jax.checkpoints.hf_config import from_hf_config
    from llada_jax.model import count_params

    config = from_hf_config(LLADA_8B_CONFIG)
    assert config == LLaDAConfig.llada_8b()
    assert count_params(config) == 8_015_581_184
    exported = to_hf_config(config, "bfloat16")
    assert {k: exported[k] for k in LLADA_8B_CONFIG if k != "transformers_version"} == {
        k: v for k, v in LLADA_8B_CONFIG.items() if k != "transformers_version"}
    assert exported["bos_token_id"] == 126080 and exported["tie_word_embeddings"] is False
    assert to_hf_config(config, "bfloat16", base=LLADA_8B_CONFIG) == LLADA_8B_CONFIG
    assert to_hf_config(config, "float32", base=LLADA_8B_CONFIG)["torch_dtype"] == "float32"
    # absent fields mean what they mean to the official code
    sparse = {k: LLADA_8B_CONFIG[k] for k in ("model_type", "d_model", "n_layers", "n_heads", "vocab_size")}
    with pytest.raises(HFConfigError, match="block_type is absent, which the official code reads as 'sequential'"):
        from_hf_config(sparse)
    sparse.update({k: LLADA_8B_CONFIG[k] for k in ("block_type", "activation_type", "layer_norm_type", "rope")})
    with pytest.raises(HFConfigError, match="embedding_size: 50304 is smaller than vocab_size 126464"):
        from_hf_config(sparse)
    sparse["embedding_size"] = None
    assert from_hf_config(sparse).weight_tying and from_hf_config(sparse).mlp_hidden_size == 4 * 4096
    with pytest.raises(HFConfigError, match=r"rope=False is not supported"):
        from_hf_config(dict(LLADA_8B_CONFIG, rope=False))


# --- import, round trips, load_pretrained -------------------------------------------------------------------


@pytest.mark.parametrize("dtype,shard", [("bfloat16", "sharded"), ("float32", "5GB")])
def test_hf_to_orbax_to_hf_is_bit_identical(tmp_path, dtype, shard):
    src = str(tmp_path / "official")
    config = LLaDAConfig.tiny(n_kv_heads=2)
    _, state = official_style_dir(src, config, dtype=dtype, shard="100KB" if shard == "sharded" else "5GB")
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    convert_from_hf(src, ckpt)
    convert_to_hf(ckpt, back, max_shard_size="100KB" if shard == "sharded" else "5GB")
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(src, "config.json")))
    reader = TensorReader(back)
    assert set(reader.tensors) == set(state)
    for k, v in state.items():
        got = reader.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert got.tobytes() == v.tobytes(), k
    # the Orbax checkpoint keeps the HF dtype and loads as a model
    loaded = load_pretrained(ckpt)
    assert loaded.config.param_dtype == dtype and loaded.blocks.q_proj[...].dtype == jnp.dtype(dtype)


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
    mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
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


def test_tokenizer_files_travel_both_ways(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(500)} | {"<unk>": 500}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = str(tmp_path / "tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tok_dir)

    run, hf_dir, back = str(tmp_path / "run"), str(tmp_path / "hf"), str(tmp_path / "back")
    save_model(jax_model("gqa"), run, tokenizer_dir=tok_dir)
    convert_to_hf(run, hf_dir)
    assert AutoTokenizer.from_pretrained(hf_dir)("w3 w7")["input_ids"] == [3, 7]
    convert_from_hf(hf_dir, back)
    assert tokenizer_path(back) == os.path.join(back, "tokenizer")
    assert AutoTokenizer.from_pretrained(tokenizer_path(back))("w9")["input_ids"] == [9]
    assert not os.path.exists(os.path.join(back, "tokenizer", "config.json"))  # only tokenizer files


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture()
def good_hf(tmp_path):
    path = str(tmp_path / "good")
    official_style_dir(path, LLaDAConfig.tiny(n_kv_heads=2), dtype="float32")
    return path


def edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def edit_weights(path, fn):
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    fn(state)
    save_file(state, file)


def assert_nothing_written(tmp_path, out):
    assert not os.path.exists(out)
    leftovers = [f for f in os.listdir(os.path.dirname(out)) if ".partial-" in f]
    assert not leftovers, leftovers


@pytest.mark.parametrize("case,error,match", [
    ("no_config", FileNotFoundError, r"no config\.json"),
    ("model_type", HFConfigError, r"model_type is 'llama'"),
    ("block_type", HFConfigError, r"block_type='sequential' is not supported"),
    ("missing_key", WeightsError, r"missing weight\(s\) model\.transformer\.blocks\.1\.up_proj\.weight"),
    ("unexpected_key", WeightsError, r"unexpected weight\(s\) model\.transformer\.blocks\.0\.q_proj\.bias"),
    ("shape", WeightsError, r"model\.transformer\.blocks\.0\.k_proj\.weight has shape \[64, 64\], but config\.json "
                            r"implies \[32, 64\]"),
    ("config_shape", WeightsError, r"model\.transformer\.wte\.weight has shape \[512, 64\], but config\.json implies "
                                   r"\[1024, 64\]"),
    ("missing_shard", FileNotFoundError, r"lists shard model-00009-of-00009\.safetensors, which does not exist"),
    ("not_safetensors", SafetensorsError, r"model\.safetensors: not a safetensors file"),
    ("no_weights", FileNotFoundError, r"no model\.safetensors or model\.safetensors\.index\.json \(found "
                                      r"pytorch_model\.bin"),
])
def test_bad_hf_input_is_a_clear_error_and_writes_nothing(good_hf, tmp_path, case, error, match):
    path = good_hf
    if case == "no_config":
        os.remove(os.path.join(path, "config.json"))
    elif case == "model_type":
        edit_config(path, model_type="llama")
    elif case == "block_type":
        edit_config(path, block_type="sequential")
    elif case == "missing_key":
        edit_weights(path, lambda s: s.pop("model.transformer.blocks.1.up_proj.weight"))
    elif case == "unexpected_key":
        edit_weights(path, lambda s: s.update({"model.transformer.blocks.0.q_proj.bias": np.zeros(64, np.float32)}))
    elif case == "shape":
        edit_weights(path, lambda s: s.update({"model.transformer.blocks.0.k_proj.weight": np.zeros((64, 64),
                                                                                                   np.float32)}))
    elif case == "config_shape":
        edit_config(path, vocab_size=1024)
    elif case == "missing_shard":
        json.dump({"weight_map": {"model.transformer.wte.weight": "model-00009-of-00009.safetensors"}},
                  open(os.path.join(path, INDEX_FILE), "w"))
    elif case == "not_safetensors":
        open(os.path.join(path, "model.safetensors"), "wb").write(b"\x00" * 64)
    elif case == "no_weights":
        os.replace(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
    out = str(tmp_path / "out")
    with pytest.raises(error, match=match):
        convert_from_hf(path, out)
    assert_nothing_written(tmp_path, out)
    if case != "no_config":
        with pytest.raises(error, match=match):
            load_pretrained(path)


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


# --- safetensors I/O ------------------------------------------------------------------------------------------


def test_safetensors_writer_and_reader_agree_with_the_safetensors_package(tmp_path):
    rng = np.random.RandomState(0)
    import ml_dtypes

    arrays = {"a": rng.randn(3, 5).astype(np.float32), "b": rng.randn(7).astype(ml_dtypes.bfloat16),
              "c": rng.randn(2, 2, 2).astype(np.float16), "d": np.zeros((0, 4), np.float32)}
    names = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
    writer = ShardedWriter(str(tmp_path), [(k, names[v.dtype], v.shape) for k, v in arrays.items()],
                           max_shard_size=1000)
    for k in ("c", "a", "d", "b"):  # any order
        writer.write(k, arrays[k])
    writer.close()
    back = load_file(str(tmp_path / "model.safetensors"))
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes()
    save_file(arrays, str(tmp_path / "lib.safetensors"))
    os.replace(tmp_path / "lib.safetensors", tmp_path / "model.safetensors")
    reader = TensorReader(str(tmp_path))
    for k, v in arrays.items():
        assert reader.read(k).tobytes() == v.tobytes() and reader.read(k).dtype == v.dtype
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("five gigs")


# --- CLI --------------------------------------------------------------------------------------------------------


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "llada_jax", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_end_to_end(tmp_path, exports):
    model, hf_dir = exports["gqa"]
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    r = run_cli("convert", "from-hf", "--input", hf_dir, "--output", ckpt, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    r = run_cli("convert", "to-hf", "--input", ckpt, "--output", back, "--max_shard_size", "50KB")
    assert r.returncode == 0, r.stderr
    assert f"wrote {back}" in r.stdout
    assert len([f for f in os.listdir(back) if f.endswith(".safetensors")]) > 2
    for k, v in hf_state_dict(model).items():
        np.testing.assert_array_equal(TensorReader(back).read(k), v.astype(jnp.bfloat16))
    assert json.load(open(os.path.join(back, "config.json")))["torch_dtype"] == "bfloat16"

    r = run_cli("convert", "from-hf", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "no such model directory" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("convert", "to-hf", "--input", ckpt, "--output", back)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("convert", "to-hf", "--input", ckpt, "--output", str(tmp_path / "y"), "--max_shard_size", "lots")
    assert r.returncode == 2 and "cannot parse size" in r.stderr and not os.path.exists(tmp_path / "y")


# --- the official modeling code (optional) ----------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("LLADA_OFFICIAL_CODE"),
                    reason="set LLADA_OFFICIAL_CODE to a directory holding the official configuration_llada.py "
                           "and modeling_llada.py (they need transformers 4.x)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_official_modeling_code_loads_the_export(exports, tmp_path, dtype):
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip(f"the official modeling code does not run under transformers {transformers.__version__} "
                    "(its model never calls post_init()); run this test with transformers 4.x")
    for kind, (model, path) in exports.items():
        official = str(tmp_path / f"official_{kind}_{dtype}")  # a directory name no other test loaded code from
        if dtype == "float32":
            shutil.copytree(path, official)
        else:
            model.save_pretrained(official, dtype=dtype, max_shard_size=KINDS[kind]["shard"])
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
