"""Import of Hugging Face directories: round trips, the tokenizer, and bad input."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import LLaDAConfig
from llada_jax.checkpoints import convert_from_hf, convert_to_hf, load_pretrained
from llada_jax.checkpoints.layout import tokenizer_path
from llada_jax.checkpoints.orbax_model import save_model
from llada_jax.checkpoints.safetensors_io import (
    INDEX_FILE,
    TensorReader,
)
from llada_jax.errors import HFConfigError, SafetensorsError, WeightsError
from tests.checkpoints.hf_helpers import (
    assert_nothing_written,
    edit_config,
    edit_weights,
    jax_model,
    official_style_dir,
)


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


@pytest.mark.parametrize("case,error,match", [
    ("no_config", FileNotFoundError, r"no config\.json"),
    ("model_type", HFConfigError, r"model_type is 'gpt2'; supported: 'llada', the Mixture-of-Experts 'llada2_moe', "
     r"'llada2_moe_veomni', 'lladamoe', 'llada_moe' and the autoregressive 'llama'"),
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
        edit_config(path, model_type="gpt2")
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
