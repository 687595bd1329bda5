"""Autoregressive checkpoints (LLaMA / Mistral / Qwen2 in the transformers layout) imported as LLaDA models:
exact against transformers with causal attention, the mask token and padded rows, and clear errors."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from llada_jax import LLaDAForMaskedLM
from llada_jax.checkpoints import convert_from_hf, load_model_and_tokenizer, read_model_config
from llada_jax.errors import CheckpointError
from tests.checkpoints.ar_helpers import FAMILIES, ar_logits, edit_config, make_ar_dir
from tests.runs import cli

RNG = np.random.RandomState(0)


def _ids(n_tok, shape=(2, 13)):
    return RNG.randint(3, n_tok, shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_import_gives_the_ar_logits(tmp_path, family):
    # Qwen2: the embedding has spare rows past the tokenizer (as Qwen2.5's 152064 rows for 151665 tokens)
    d, hf_model, n_tok = make_ar_dir(str(tmp_path / family), family, extra_rows=40 if family == "qwen2" else 0)
    model = LLaDAForMaskedLM.from_pretrained(d, attention_type="causal")
    c = model.config
    assert c.include_qkv_bias == (family == "qwen2")
    assert (c.n_kv_heads, c.rope_theta, c.rms_norm_eps, c.weight_tying) == (2, 1000.0, 1e-5, False)
    assert c.mask_token_id == n_tok and c.embedding_size % 128 == 0 and c.embedding_size > c.mask_token_id
    ids = _ids(n_tok)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    ref = ar_logits(hf_model, ids, mask)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    err = np.abs(got[..., :n_tok] - ref[..., :n_tok])[real].max() / np.abs(ref[real]).max()
    assert err < 1e-4, err
    # shift_logits keeps the AR alignment: the prediction for position i is the AR output at i - 1
    shifted = LLaDAForMaskedLM.from_pretrained(d, attention_type="causal", shift_logits=True)
    plain = ar_logits(hf_model, ids)
    got = np.asarray(shifted(jnp.asarray(ids)))[..., :n_tok]
    np.testing.assert_allclose(got[:, 1:], plain[:, :-1, :n_tok], atol=1e-4 * np.abs(plain).max())
    np.testing.assert_allclose(got[:, 0], plain[:, 0, :n_tok], atol=1e-4 * np.abs(plain).max())


def test_tied_bf16_sharded_import_streams_exactly(tmp_path):
    d, hf_model, n_tok = make_ar_dir(str(tmp_path / "m"), "llama", tied=True, dtype=torch.bfloat16,
                                     shard_size="40KB")
    assert any(f.endswith(".index.json") for f in os.listdir(d))
    model = LLaDAForMaskedLM.from_pretrained(d, attention_type="causal", dtype="float32", param_dtype="float32")
    assert model.config.weight_tying and not hasattr(model, "ff_out")
    ids = _ids(n_tok)
    ref = ar_logits(hf_model.float(), ids)
    got = np.asarray(model(jnp.asarray(ids)))[..., :n_tok]
    assert np.abs(got - ref[..., :n_tok]).max() / np.abs(ref).max() < 1e-4


def test_mask_token_rows_and_tokenizer(tmp_path):
    d, hf_model, n_tok = make_ar_dir(str(tmp_path / "m"), "llama")
    out = convert_from_hf(d, str(tmp_path / "run"))
    model, tok = load_model_and_tokenizer(out)
    c = model.config
    rows = -(-(n_tok + 1) // 128) * 128
    assert (c.mask_token_id, c.vocab_size, c.embedding_size) == (n_tok, n_tok + 1, rows)
    assert c.eos_token_id == 2 and c.pad_token_id == 2 and c.bos_token_id == 1
    assert (c.attention_type, c.shift_logits) == ("bidirectional", False)  # a LLaDA model unless asked
    # the tokenizer copy has <|mdm_mask|> at the mask id and encodes it as one token
    assert tok.mask_token_id == n_tok
    assert tok.tokenizer.convert_ids_to_tokens(n_tok) == "<|mdm_mask|>"
    assert tok.tokenizer.encode("hello<|mdm_mask|>", add_special_tokens=False)[-1] == n_tok
    # the original rows are the checkpoint's; the mask row and the padding rows are the mean of them
    emb = hf_model.model.embed_tokens.weight.detach().numpy()
    head = hf_model.lm_head.weight.detach().numpy()
    wte, ff_out = np.asarray(model.wte[...]), np.asarray(model.ff_out[...])
    np.testing.assert_array_equal(wte[:n_tok], emb)
    np.testing.assert_array_equal(ff_out[:, :n_tok], head.T)
    np.testing.assert_allclose(wte[n_tok:], np.broadcast_to(emb.mean(0), (rows - n_tok, emb.shape[1])), atol=1e-7)
    np.testing.assert_allclose(ff_out[:, n_tok:].T, np.broadcast_to(head.mean(0), (rows - n_tok, head.shape[1])),
                               atol=1e-7)
    # the same directory read without its weights gives the same config
    assert read_model_config(d) == c.replace(dtype="float32", param_dtype="float32")


def test_reserved_token_as_mask(tmp_path):
    d, _, n_tok = make_ar_dir(str(tmp_path / "m"), "llama")
    model, tok = load_model_and_tokenizer(d, mask_token="<|reserved_0|>")
    reserved = tok.tokenizer.convert_tokens_to_ids("<|reserved_0|>")
    assert model.config.mask_token_id == reserved == tok.mask_token_id and reserved < n_tok
    assert model.config.embedding_size == -(-n_tok // 128) * 128 and model.config.vocab_size == n_tok
    with pytest.raises(Exception, match="<|nope|>.*not a token"):
        LLaDAForMaskedLM.from_pretrained(d, mask_token="<|nope|>")


def _expect_error(tmp_path, d, *needles):
    out = tmp_path / "out"
    proc = cli("convert", "from-hf", "--input", d, "--output", str(out), check=False, devices=1)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and not out.exists(), err
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out") or "tmp" in p], os.listdir(tmp_path)
    for needle in needles:
        assert needle in err, err
    assert len(err.splitlines()) == 1, err


def test_bad_ar_checkpoints_are_one_clear_error(tmp_path):
    d, _, _ = make_ar_dir(str(tmp_path / "m"), "llama")
    edit_config(d, model_type="gpt2")
    _expect_error(tmp_path, d, "model_type is 'gpt2'", "'llama'", "'qwen2'")
    edit_config(d, model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                        "factor": 8.0})
    _expect_error(tmp_path, d, "rope_parameters", "llama3")
    edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                rope_scaling={"rope_type": "linear", "factor": 2.0})
    _expect_error(tmp_path, d, "rope_scaling", "linear")
    edit_config(d, rope_scaling=None, hidden_act="gelu")
    _expect_error(tmp_path, d, "hidden_act='gelu'")
    edit_config(d, hidden_act="silu", mlp_bias=True)
    _expect_error(tmp_path, d, "mlp_bias=True")
    edit_config(d, mlp_bias=False)
    weights = os.path.join(d, "model.safetensors")
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, weights)
    _expect_error(tmp_path, d, "missing weight", "model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]
    save_file(tensors, weights)
    _expect_error(tmp_path, d, "model.layers.0.self_attn.k_proj.weight has shape [16, 64]", "[32, 64]")


def test_sliding_window_caps_the_length_and_longer_is_an_error(tmp_path):
    d, _, _ = make_ar_dir(str(tmp_path / "m"), "mistral", sliding_window=64)
    assert read_model_config(d).max_sequence_length == 64
    with pytest.raises(CheckpointError, match="sliding_window=64.*max_sequence_length 128"):
        LLaDAForMaskedLM.from_pretrained(d, max_sequence_length=128)
    # Qwen2 windows only with use_sliding_window
    q, _, _ = make_ar_dir(str(tmp_path / "q"), "qwen2", sliding_window=64, use_sliding_window=False)
    assert read_model_config(q).max_sequence_length == 256


def test_special_ids_missing_from_config_json_come_from_the_tokenizer_or_stay_unset(tmp_path):
    """transformers 5 writes bos / eos / pad as null unless they are given (issue 28). An id config.json leaves
    unset is read from the directory's tokenizer, the pad from the EOS when neither names one (LLaDA pads with its
    EOS); without a tokenizer it stays unset, for training and sampling to name."""
    d, _, _ = make_ar_dir(str(tmp_path / "tok"), "qwen2", bos_token_id=None, eos_token_id=None)
    c = read_model_config(d)  # the helper's tokenizer: BOS <s> = 1, EOS </s> = 2, no pad token
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    d, _, _ = make_ar_dir(str(tmp_path / "none"), "qwen2", tokenizer=False, bos_token_id=None, eos_token_id=None)
    c = read_model_config(d)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (None, None, None)
