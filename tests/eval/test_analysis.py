"""Analysis tools: attention maps against the independent PyTorch forward's attention probabilities, heatmap
files, and the sampler comparison table."""

import dataclasses
import os

import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, generate
from llada_jax.checkpoints.hf_keys import hf_state_dict
from llada_jax.eval.analysis import (
    ModelAnalyzer,
    compare_sampling_methods,
    format_table,
)
from tests.torch_reference import llada_logits

EOS = 510


@pytest.mark.parametrize("scan_layers", [True, False])
def test_attention_maps_are_the_models_attention_probabilities(tmp_path, scan_layers):
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(n_kv_heads=2, scan_layers=scan_layers), rngs=nnx.Rngs(3))
    ids = np.array([[7, 7, 3, 17, 42, 99, 511, 511], [8, 1, 300, 65, 12, 77, 5, 511]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], np.int32)
    analyzer = ModelAnalyzer(str(tmp_path))
    maps = analyzer.analyze_attention_patterns(model, ids, mask, save_plots=scan_layers, example=1)
    assert maps.shape == (2, 2, 4, 8, 8)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)  # a distribution over the keys
    assert (maps[:, 0, :, :, :2] == 0).all()  # padded keys get nothing
    probs = []
    llada_logits(hf_state_dict(model), dataclasses.asdict(model.config), ids, mask, attention_probs=probs)
    np.testing.assert_allclose(maps, np.stack(probs), rtol=1e-4, atol=1e-6)
    if scan_layers:
        assert sorted(os.listdir(tmp_path / "attention")) == ["layer_00.png", "layer_01.png"]
        assert all(os.path.getsize(p) > 1000 for p in analyzer.last_plots)


class DigitTokenizer:
    """A stand-in tokenizer: token t decodes to the text str(t) + ' '."""

    eot_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"{int(t)} " for t in ids if not (skip_special_tokens and t >= 509))


def test_compare_sampling_methods_scores_exact_match_nfe_and_speed(tmp_path):
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))
    prompts = [[3, 17, 42], [8, 1, 300, 65], [9, 9], [4, 5, 6, 7, 8]]
    ids = np.array([[EOS, EOS] + prompts[0], prompts[3]], np.int32)
    attn = np.array([[0, 0, 1, 1, 1], [1] * 5], np.int32)
    greedy = np.asarray(generate(model, ids, attn, gen_length=8, block_length=4, steps=8))[:, 5:]

    def upto_eos(row):
        row = list(row)
        return row[:row.index(EOS)] if EOS in row else row

    reference, text3 = upto_eos(greedy[0]), DigitTokenizer().decode(upto_eos(greedy[1]), True)
    # example 0: the greedy answer as ids (+ EOS), 1: wrong ids, 2: wrong text, 3: the greedy answer as text
    dataset = [(prompts[0], reference + [EOS]), (prompts[1], [1, 2, 3]), (prompts[2], "no"), (prompts[3], text3)]
    settings = [dict(name="base", method="semi_ar_padding", gen_length=8, block_length=4, steps=8),
                dict(name="fast", method="semi_ar_padding", gen_length=8, block_length=4, threshold=0.02,
                     cache="dual")]
    rows = ModelAnalyzer(str(tmp_path)).compare_sampling_methods(model, dataset, settings,
                                                                 tokenizer=DigitTokenizer(), batch_size=3)
    assert [r["name"] for r in rows] == ["base", "fast"]
    base, fast = rows
    assert base["accuracy"] == 0.5 and base["nfe"] == 8 and base["examples"] == 4
    assert fast["threshold"] == 0.02 and fast["cache"] == "dual" and fast["steps"] is None
    assert 2 <= fast["nfe"] < 8 and fast["tokens_per_s"] > 0 and fast["seconds"] > 0
    assert os.path.exists(tmp_path / "sampling_comparison.json")
    assert "| base | 50.0% | 8.0 |" in format_table(rows)
    with pytest.raises(ValueError, match="text answers need a tokenizer"):
        compare_sampling_methods(model, dataset, settings)
