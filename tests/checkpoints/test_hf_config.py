"""config.json of the official layout <-> LLaDAConfig."""

import pytest

from llada_jax import LLaDAConfig
from llada_jax.checkpoints.hf_config import to_hf_config
from llada_jax.errors import HFConfigError
from tests.checkpoints.hf_helpers import LLADA_8B_CONFIG


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


def test_model_type_fields_map_both_ways():
    from llada_jax.checkpoints.hf_config import from_hf_config

    plain = to_hf_config(LLaDAConfig.tiny(), "float32")
    assert (plain["include_qkv_bias"], plain["attention_type"], plain["shift_logits"]) == (False, "bidirectional", False)
    typed = LLaDAConfig.tiny(include_qkv_bias=True, attention_type="causal", shift_logits=True)
    exported = to_hf_config(typed, "float32")
    assert (exported["include_qkv_bias"], exported["attention_type"], exported["shift_logits"]) == (True, "causal", True)
    assert from_hf_config(exported) == typed
    assert from_hf_config(plain) == LLaDAConfig.tiny()

    # an official config.json has no attention_type / shift_logits: a bidirectional, unshifted model
    official = from_hf_config(dict(LLADA_8B_CONFIG, include_qkv_bias=True))
    assert (official.include_qkv_bias, official.attention_type, official.shift_logits) == (True, "bidirectional", False)
    assert from_hf_config(dict(LLADA_8B_CONFIG, include_qkv_bias=None)).include_qkv_bias is False
    # written back onto the official base: absent fields stay absent while they mean the same
    base = dict(LLADA_8B_CONFIG, include_qkv_bias=None)
    assert to_hf_config(from_hf_config(base), "bfloat16", base=base) == base
    changed = to_hf_config(LLaDAConfig.llada_8b(**{k: getattr(typed, k) for k in ("include_qkv_bias", "attention_type",
                                                                                  "shift_logits")}),
                           "bfloat16", base=LLADA_8B_CONFIG)
    assert changed == dict(LLADA_8B_CONFIG, include_qkv_bias=True, attention_type="causal", shift_logits=True)


@pytest.mark.parametrize("field, value", [("attention_type", "sideways"), ("attention_type", None),
                                          ("shift_logits", "yes"), ("include_qkv_bias", 1)])
def test_a_bad_model_type_field_is_one_clear_error(good_hf, tmp_path, field, value):
    import os

    from llada_jax.checkpoints import convert_from_hf, load_pretrained
    from tests.checkpoints.hf_helpers import assert_nothing_written, edit_config

    edit_config(good_hf, **{field: value})
    config_json = os.path.join(good_hf, "config.json")
    with pytest.raises(HFConfigError) as e:
        load_pretrained(good_hf)
    message = str(e.value)
    assert config_json in message and field in message and repr(value) in message, message
    assert message.count(field) == 1 and "\n" not in message, message
    out = str(tmp_path / "out")
    with pytest.raises(HFConfigError, match=field):
        convert_from_hf(good_hf, out)
    assert_nothing_written(tmp_path, out)
