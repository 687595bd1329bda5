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
