"""The MoE reference (tests/moe_reference.py) checked against facts worked out by hand, not against llada_jax."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests.moe_reference import (
    apply_partial_rope, block_causal_visible, llada2_logits, llada_moe_logits, merged_to_per_expert,
    random_weights, route, tiny_llada2_config, tiny_llada_moe_config, write_hf_dir)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_group_limited_route_drops_the_best_expert_s_group_and_breaks_ties_low():
    cfg = tiny_llada2_config()  # 8 experts in 4 groups of 2, keep 2 groups, top-2, norm, x2.5
    # groups (top-2 sigmoid sums): {0,1} 1.00, {2,3} 1.76, {4,5} 1.55, {6,7} 1.00: groups 1 and 2 are kept,
    # so expert 0 (the best single score) is dropped, and experts 2 and 3 tie: 2 first.
    logits = np.array([[5.0, -5.0, 2.0, 2.0, 1.5, 1.0, 0.0, 0.0]], np.float32)
    indices, weights = route(logits, cfg, np.zeros(8, np.float32))
    assert indices.tolist() == [[2, 3]]
    np.testing.assert_allclose(weights, [[1.25, 1.25]], rtol=1e-6)


def test_group_ties_go_to_the_lower_group():
    cfg = tiny_llada2_config(num_experts_per_tok=3)
    indices, _ = route(np.zeros((2, 8), np.float32), cfg, None)  # every group and every expert ties
    assert indices.tolist() == [[0, 1, 2]] * 2


def test_expert_bias_selects_but_does_not_weigh():
    cfg = tiny_llada2_config(n_group=1, num_experts_per_tok=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    logits = np.array([[1.0, 0.9, 0, 0, 0, 0, 0, 0]], np.float32)
    bias = np.array([0, 0.5, 0, 0, 0, 0, 0, 0], np.float32)
    assert route(logits, cfg, None)[0].tolist() == [[0]]
    indices, weights = route(logits, cfg, bias)
    assert indices.tolist() == [[1]]
    np.testing.assert_allclose(weights, [[sigmoid(0.9)]], rtol=1e-6)
    # the bias counts only where the config enables it
    assert route(logits, dict(cfg, moe_router_enable_expert_bias=False), bias)[0].tolist() == [[0]]


def test_softmax_route_of_llada_moe():
    cfg = tiny_llada_moe_config()
    logits = np.log(np.array([[1, 2, 3, 4, 0.5, 0.5, 0.5, 0.5]], np.float32))  # probabilities: these / 11.0
    indices, weights = route(logits, cfg, None)
    assert indices.tolist() == [[3, 2]]
    np.testing.assert_allclose(weights, [[4 / 12, 3 / 12]], rtol=1e-6)  # not normalised over the top-k


def test_weights_sum_to_the_routed_scaling_factor():
    cfg = tiny_llada2_config()
    rng = np.random.default_rng(0)
    indices, weights = route(rng.standard_normal((64, 8)).astype(np.float32), cfg, rng.normal(0, 0.05, 8))
    np.testing.assert_allclose(weights.sum(-1), 2.5, rtol=1e-6)
    assert weights.dtype == np.float32 and all(len(set(row)) == 2 for row in indices.tolist())


def test_partial_rope_leaves_the_last_dims_position_independent():
    x = torch.randn(1, 2, 1, 8).expand(1, 2, 5, 8)  # the same vector at 5 positions
    out = apply_partial_rope(x, torch.arange(5)[None], 4, 600000.0)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[:, :, 1, :4], out[:, :, 0, :4])
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])  # position 0: no rotation
    # the rotated part's dot products depend only on the distance between positions
    q, k = torch.randn(2, 1, 1, 1, 8)
    dot = [(apply_partial_rope(q, torch.tensor([[m]]), 4, 100.0)[..., :4]
            * apply_partial_rope(k, torch.tensor([[m + 2]]), 4, 100.0)[..., :4]).sum() for m in (0, 3, 7)]
    torch.testing.assert_close(dot[1], dot[0])
    torch.testing.assert_close(dot[2], dot[0])


@pytest.mark.parametrize("family", ["llada2", "llada_moe"])
def test_logits_are_invariant_to_left_padding(family):
    cfg = tiny_llada2_config() if family == "llada2" else tiny_llada_moe_config()
    logits_fn = llada2_logits if family == "llada2" else llada_moe_logits
    weights = random_weights(cfg, seed=1)
    ids = np.random.default_rng(2).integers(0, 90, (1, 6))
    padded = np.concatenate([np.full((1, 2), cfg["pad_token_id"]), ids], 1)
    mask = np.concatenate([np.zeros((1, 2)), np.ones((1, 6))], 1).astype(np.int64)
    plain = logits_fn(weights, cfg, ids)
    assert plain.shape == (1, 6, 96) and plain.dtype == np.float32 and np.isfinite(plain).all()
    np.testing.assert_allclose(logits_fn(weights, cfg, padded, mask)[:, 2:], plain, rtol=1e-5, atol=1e-5)


def test_visible_restricts_attention():
    cfg = tiny_llada2_config()
    weights = random_weights(cfg, seed=3)
    ids = np.random.default_rng(4).integers(0, 90, (1, 8))
    visible = block_causal_visible(8, 4)
    assert visible.tolist()[1] == [True] * 4 + [False] * 4 and visible[5].all()
    full = llada2_logits(weights, cfg, ids, visible=visible)
    # the first block sees only itself: changing the second block leaves it alone
    changed = ids.copy()
    changed[0, 4:] = (changed[0, 4:] + 1) % 90
    np.testing.assert_allclose(llada2_logits(weights, cfg, changed, visible=visible)[:, :4], full[:, :4],
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(llada2_logits(weights, cfg, changed)[:, :4], full[:, :4])


def test_merged_and_per_expert_layouts_agree(tmp_path):
    cfg = tiny_llada2_config()
    per_expert, merged = random_weights(cfg, seed=5), random_weights(cfg, seed=5, layout="merged")
    assert merged["model.layers.1.mlp.experts.down_proj"].shape == (8, 32, 16)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" not in merged
    converted = merged_to_per_expert(merged)
    assert converted.keys() == per_expert.keys()
    ids = np.random.default_rng(6).integers(0, 90, (2, 5))
    np.testing.assert_array_equal(llada2_logits(merged, cfg, ids), llada2_logits(per_expert, cfg, ids))

    write_hf_dir(tmp_path / "merged", cfg, merged)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llada2_moe_veomni"
    write_hf_dir(tmp_path / "sharded", cfg, per_expert, shards=3)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(per_expert) and len(set(index["weight_map"].values())) == 3
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / "sharded" / file))
    assert all(np.array_equal(loaded[k], per_expert[k]) for k in per_expert)
    assert json.loads((tmp_path / "sharded" / "config.json").read_text())["model_type"] == "llada2_moe"
