"""Helpers of the checkpoint tests: tiny models of two kinds, HF directories shaped like the official ones,
PyTorch logits."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.checkpoints.hf_config import to_hf_config
from llada_jax.checkpoints.hf_keys import hf_state_dict
from llada_jax.checkpoints.safetensors_io import (
    INDEX_FILE,
    TensorReader,
)
from tests.runs import ROOT

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


def perturb_qkv_biases(model, seed=1, scale=0.5):
    """Give the q/k/v biases (initialised to zero) random values, so that a dropped, misplaced or mis-shaped
    bias changes the logits."""
    rng = np.random.RandomState(seed)
    found = 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path[-1] in ("q_bias", "k_bias", "v_bias"):
            var[...] = jnp.asarray(rng.randn(*var.shape) * scale, var.dtype)
            found += 1
    assert found, "the model has no q/k/v biases"
    return model


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


def official_style_dir(path, config, dtype="bfloat16", shard="5GB", seed=0):
    """An HF directory shaped like GSAI-ML/LLaDA-8B-Base (its config.json fields, no bos_token_id), with
    random weights written by the `safetensors` package (not by this project's writer)."""
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(seed))
    hf = to_hf_config(config, dtype)
    for name in ("bos_token_id", "tie_word_embeddings", "attention_type", "shift_logits"):  # not official
        hf.pop(name)
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


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "llada_jax", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
