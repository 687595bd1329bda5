"""TokenizerHelper, the LLaDA chat template and model-config fitting."""

import json
import pickle

import pytest

from llada_jax.config import LLaDAConfig
from llada_jax.tokenizer import (
    TokenizerHelper,
    check_compatible,
    config_overrides,
)


def test_encode_decode_round_trip_and_no_special_tokens_added(helper):
    text = "The capital of France is Paris. \u00e9\u00e8 \U0001F600"
    ids = helper.encode(text)
    assert helper.decode(ids) == text
    assert all(i < 506 for i in ids)  # byte-level: any text encodes without unknown or special ids
    assert helper.encode("<|mdm_mask|>x") == [511] + helper.encode("x")  # special tokens in text are split out


def test_chat_template_text_and_tokens(helper):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is the capital of France?\n"}]
    text = helper.render_chat(messages, add_generation_prompt=True)
    assert text == ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    e = helper.encode
    expected = ([509, 506] + e("system") + [507] + e("\n\nBe brief.") + [508, 506] + e("user") + [507]
                + e("\n\nWhat is the capital of France?") + [508, 506] + e("assistant") + [507] + e("\n\n"))
    assert helper.apply_chat_template(messages) == expected
    assert not helper.render_chat(messages, add_generation_prompt=False).endswith("assistant<|end_header_id|>\n\n")


def test_helper_pickles_as_its_path(helper):
    blob = pickle.dumps(helper)
    assert len(blob) < 500
    clone = pickle.loads(blob)
    assert clone.special_ids() == helper.special_ids() and clone.encode("Paris") == helper.encode("Paris")


def test_config_overrides_and_mismatch_report(helper):
    overrides = config_overrides(helper)
    assert overrides == {"vocab_size": 512, "mask_token_id": 511, "eos_token_id": 510, "pad_token_id": 510,
                         "bos_token_id": 509}
    assert config_overrides(helper, pad_to_multiple_of=384)["vocab_size"] == 768
    model = LLaDAConfig.tiny(**config_overrides(helper))
    check_compatible(helper, model)
    with pytest.raises(ValueError) as e:
        check_compatible(helper, LLaDAConfig.tiny(vocab_size=500, mask_token_id=499, eos_token_id=498,
                                                  pad_token_id=498, bos_token_id=497))
    msg = str(e.value)
    assert "512 ids but the model's vocabulary is 500" in msg
    assert "mask_token_id: tokenizer 511, model 499" in msg and "eos_token_id: tokenizer 510, model 498" in msg
    assert "bos_token_id: tokenizer 509, model 497" in msg


def test_mask_token_found_by_text_and_offline_only(tmp_path, tokenizer_dir):
    # A tokenizer that declares no mask token (like the official LLaDA one): the helper finds <|mdm_mask|>.
    import shutil

    d = tmp_path / "nomask"
    shutil.copytree(tokenizer_dir, d)
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg.pop("mask_token")
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    h = TokenizerHelper(str(d))
    assert h.tokenizer.mask_token is None and h.mask_token_id == 511
    assert TokenizerHelper(str(d), mask_token_id=7).mask_token_id == 7
    with pytest.raises(FileNotFoundError, match="not a local directory .* loaded offline"):
        TokenizerHelper("GSAI-ML/LLaDA-8B-Instruct")
