"""build_bpe_tokenizer: an offline byte-level BPE tokenizer with the LLaDA special tokens on the top ids."""

import json
import os

import pytest

from llada_jax.config import LLaDAConfig
from llada_jax.data.bpe import build_bpe_tokenizer
from llada_jax.tokenizer import (
    LLADA_SPECIAL_TOKENS,
    check_compatible,
)


def test_built_tokenizer_is_a_normal_hf_directory_with_llada_ids(tokenizer_dir, helper):
    from transformers import AutoTokenizer

    assert sorted(os.listdir(tokenizer_dir)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert len(tok) == 512
    assert [tok.convert_tokens_to_ids(t) for t in LLADA_SPECIAL_TOKENS] == [506, 507, 508, 509, 510, 511]
    assert helper.special_ids() == {"mask": 511, "eos": 510, "bos": 509, "pad": 510, "start_header": 506,
                                    "end_header": 507, "eot": 508}
    tiny = LLaDAConfig.tiny()
    assert (tiny.vocab_size, tiny.mask_token_id, tiny.eos_token_id, tiny.pad_token_id, tiny.bos_token_id) == (
        512, helper.mask_token_id, helper.eos_token_id, helper.pad_token_id, helper.bos_token_id)
    check_compatible(helper, tiny)  # the tiny model fits the tiny tokenizer as it is
    cfg = json.load(open(os.path.join(tokenizer_dir, "tokenizer_config.json")))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in cfg


def test_builder_fills_a_small_corpus_and_places_specials_on_top(tmp_path):
    helper = build_bpe_tokenizer(["ab ab ab"], str(tmp_path / "t"), vocab_size=300)
    assert len(helper) == 300 and helper.mask_token_id == 299 and helper.eos_token_id == 298
    tokens = helper.tokenizer.convert_ids_to_tokens(list(range(300)))
    reserved = [i for i, t in enumerate(tokens) if t.startswith("<|reserved_token_")]
    assert reserved and reserved == list(range(294 - len(reserved), 294))  # fillers right below the specials
    assert helper.decode(helper.encode("ab ba")) == "ab ba"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("line one\nline two\n")
    assert len(build_bpe_tokenizer(None, str(tmp_path / "t"), files=[str(corpus)], vocab_size=270)) == 270
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        build_bpe_tokenizer(["x"], str(tmp_path / "u"), vocab_size=100)
    with pytest.raises(ValueError, match="corpus is empty"):
        build_bpe_tokenizer([], str(tmp_path / "u"))
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path))
