"""An independent PyTorch + numpy reference for the mixture-of-experts LLaDA families, written from the
architecture facts.

It shares no code with llada_jax. Two Hugging Face layouts are followed:

* LLaDA 2.x (LLaDA2.0 / 2.1, model_type "llada2_moe"): fused query_key_value (all q heads, then all k heads, then
  all v heads), per-head RMSNorm of q and k before a partial NeoX rotary, grouped-query attention, the first
  `first_k_dense_replace` layers dense SwiGLU, then MoE layers: an fp32 router (sigmoid or softmax scores, an
  expert bias used for selection only, group-limited top-k), SwiGLU experts and an ungated shared expert.
  dFactory's merged-expert layout ("llada2_moe_veomni": experts.{gate,up,down}_proj stacked [E, out, in]) is
  accepted too and converted to per-expert keys first.
* LLaDA-MoE-7B-A1B (model_type "lladamoe", OLMoE-style): separate q/k/v/o projections, per-head q/k RMSNorm,
  a softmax router over all experts, every layer MoE, no shared expert.

Weights come in as plain numpy arrays (Linear weights [out, in]); attention uses explicit matrices; everything is
float32. The router breaks ties towards the lower expert index (and the lower group index when choosing groups).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from safetensors.numpy import save_file

from tests.torch_reference import rms_norm, rotate_half  # the same formulas as LLaDA's

_MERGED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)")


# ----------------------------------------------------------------------------------------------------- routing
def _is_llada2(cfg: dict) -> bool:
    return str(cfg.get("model_type", "")).startswith("llada2")


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of the last axis, descending; a stable sort of -x keeps equal values in
    index order, so a tie goes to the lower index."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def route(logits: np.ndarray, cfg: dict, expert_bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The router's choice for fp32 `logits` [T, E]: (expert indices [T, k], their weights [T, k] float32)."""
    logits = np.asarray(logits, np.float32)
    tokens, n_experts = logits.shape
    k = cfg["num_experts_per_tok"]
    score_function = (cfg.get("score_function") or cfg.get("moe_router_score_function")
                      or ("sigmoid" if _is_llada2(cfg) else "softmax"))
    # scores in float64, then rounded once to float32 (equal logits still give exactly equal scores)
    x = logits.astype(np.float64)
    if score_function == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-x))
    elif score_function == "softmax":
        e = np.exp(x - x.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        raise ValueError(f"unknown score function {score_function!r}")
    scores = scores.astype(np.float32)

    biased = scores
    if expert_bias is not None and cfg.get("moe_router_enable_expert_bias"):
        biased = scores + np.asarray(expert_bias, np.float32)  # selection only: the weights stay unbiased

    selectable = biased
    n_group = cfg.get("n_group") or 1
    if n_group > 1:
        assert n_experts % n_group == 0, (n_experts, n_group)
        per_group = n_experts // n_group
        grouped = biased.reshape(tokens, n_group, per_group)
        best = -np.sort(-grouped, axis=-1)[..., :min(2, per_group)]
        group_scores = best.sum(-1, dtype=np.float32)  # a group's score: its top-2 biased scores summed
        keep = np.zeros((tokens, n_group), bool)
        np.put_along_axis(keep, _top_k(group_scores, cfg["topk_group"]), True, axis=-1)
        selectable = np.where(np.repeat(keep, per_group, axis=-1), biased, -np.inf)
        assert k <= cfg["topk_group"] * per_group, "fewer experts in the kept groups than num_experts_per_tok"

    indices = _top_k(selectable, k)
    weights = np.take_along_axis(scores, indices, axis=-1)
    if cfg.get("norm_topk_prob"):
        weights = weights / (weights.sum(-1, keepdims=True) + np.float32(1e-20))
    weights = weights * np.float32(cfg.get("routed_scaling_factor") or 1.0)
    return indices.astype(np.int64), weights.astype(np.float32)


# ------------------------------------------------------------------------------------------------ layer pieces
def rotary_dim(cfg: dict, head_dim: int) -> int:
    """int(head_dim * partial_rotary_factor); a config's own "rotary_dim", when it has both, must agree."""
    factor = cfg.get("partial_rotary_factor")
    explicit = cfg.get("rotary_dim")
    dim = int(head_dim * (1.0 if factor is None else factor))
    if explicit is not None:
        assert factor is None or explicit == dim, f"rotary_dim {explicit} != head_dim * factor {dim}"
        dim = explicit
    assert dim % 2 == 0 and 0 < dim <= head_dim, dim
    return dim


def apply_partial_rope(x: torch.Tensor, positions: torch.Tensor, rot_dim: int, theta: float) -> torch.Tensor:
    """NeoX rotary on the first `rot_dim` dims of each head of x [B, heads, L, head_dim] at `positions` [B, L];
    the remaining head_dim - rot_dim dims pass through unchanged."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    angles = positions.double()[..., None] * inv_freq  # [B, L, rot_dim / 2]
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)  # [B, 1, L, rot_dim]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], -1)


def block_causal_visible(length: int, block_size: int) -> np.ndarray:
    """bool [L, L]: query i sees key j when j's block is not after i's."""
    block = np.arange(length) // block_size
    return block[None, :] <= block[:, None]


def _allowed(mask: torch.Tensor, visible, length: int) -> torch.Tensor:
    """bool [B, 1, L, L]: keys that are real tokens and visible; a query that sees none sees every key (uniform)."""
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
    if visible is not None:
        vis = torch.from_numpy(np.asarray(visible, bool))
        allowed = allowed & (vis[None, None] if vis.ndim == 2 else vis[:, None])
    return allowed | ~allowed.any(-1, keepdim=True)


def attention(q, k, v, allowed, n_heads: int, n_kv: int) -> torch.Tensor:
    """q [B, nH, L, hd], k / v [B, nKV, L, hd] -> [B, L, nH * hd]; q head h reads kv head h // (nH / nKV)."""
    b, _, length, hd = q.shape
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * hd ** -0.5
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2).reshape(b, length, n_heads * hd)


def swiglu(x: torch.Tensor, W: dict, prefix: str) -> torch.Tensor:
    gate = x @ W[prefix + "gate_proj.weight"].T
    up = x @ W[prefix + "up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ W[prefix + "down_proj.weight"].T


def moe(x: torch.Tensor, W: dict, prefix: str, cfg: dict) -> torch.Tensor:
    """Routed experts (weights applied in fp32, summed, cast back) plus the ungated shared expert when present."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    logits = flat.float() @ W[prefix + "gate.weight"].float().T
    bias = W.get(prefix + "gate.expert_bias")
    indices, weights = route(logits.numpy(), cfg, None if bias is None else bias.numpy())
    out = torch.zeros(flat.shape, dtype=torch.float32)
    for e in range(cfg["num_experts"]):
        token, slot = np.nonzero(indices == e)
        if len(token):
            y = swiglu(flat[token], W, f"{prefix}experts.{e}.").float()
            out.index_add_(0, torch.from_numpy(token), y * torch.from_numpy(weights[token, slot])[:, None])
    out = out.to(x.dtype)
    if prefix + "shared_experts.gate_proj.weight" in W:
        out = out + swiglu(flat, W, prefix + "shared_experts.")
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------------ the forwards
def _forward(weights, cfg, input_ids, attention_mask, visible, embed_key, layer) -> np.ndarray:
    """Embedding, `layer(i, x, positions, allowed)` for every layer, final norm and lm_head (float32 logits)."""
    W = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in merged_to_per_expert(weights).items()}
    ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    b, length = ids.shape
    if attention_mask is None:
        attention_mask = np.ones((b, length), np.int64)
    mask = torch.from_numpy(np.asarray(attention_mask, np.int64))
    positions = (torch.cumsum(mask, -1) - 1).clamp(min=0)  # absolute positions count real tokens only
    allowed = _allowed(mask, visible, length)
    x = W[embed_key][ids]
    for i in range(cfg["num_hidden_layers"]):
        x = layer(W, i, x, positions, allowed)
    x = rms_norm(x, W["model.norm.weight"], cfg["rms_norm_eps"])
    return (x @ W["lm_head.weight"].T).float().numpy()


def llada2_logits(weights: dict[str, np.ndarray], cfg: dict, input_ids: np.ndarray,
                  attention_mask: np.ndarray | None = None, visible: np.ndarray | None = None) -> np.ndarray:
    """Logits [B, L, V] of a llada2_moe model (per-expert or merged-expert keys). `visible` [L, L] or [B, L, L]
    (True: query i may see key j) restricts attention beyond `attention_mask`; None: bidirectional."""
    hidden, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    hd = cfg.get("head_dim") or hidden // n_heads
    rot, eps = rotary_dim(cfg, hd), cfg["rms_norm_eps"]

    def layer(W, i, x, positions, allowed):
        p = f"model.layers.{i}."
        b, length, _ = x.shape
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        qkv = h @ W[p + "attention.query_key_value.weight"].T
        q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
        q = q.view(b, length, n_heads, hd).transpose(1, 2)
        k = k.view(b, length, n_kv, hd).transpose(1, 2)
        v = v.view(b, length, n_kv, hd).transpose(1, 2)
        if cfg.get("use_qk_norm", True):  # per head, over head_dim, before the rotary
            q = rms_norm(q, W[p + "attention.query_layernorm.weight"], eps)
            k = rms_norm(k, W[p + "attention.key_layernorm.weight"], eps)
        q = apply_partial_rope(q, positions, rot, cfg["rope_theta"])
        k = apply_partial_rope(k, positions, rot, cfg["rope_theta"])
        h = x + attention(q, k, v, allowed, n_heads, n_kv) @ W[p + "attention.dense.weight"].T
        m = rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
        if i < cfg.get("first_k_dense_replace", 0):
            return h + swiglu(m, W, p + "mlp.")
        return h + moe(m, W, p + "mlp.", cfg)

    return _forward(weights, cfg, input_ids, attention_mask, visible, "model.word_embeddings.weight", layer)


def llada_moe_logits(weights: dict[str, np.ndarray], cfg: dict, input_ids: np.ndarray,
                     attention_mask: np.ndarray | None = None, visible: np.ndarray | None = None) -> np.ndarray:
    """Logits [B, L, V] of LLaDA-MoE-7B-A1B's layout (OLMoE-style: every layer MoE, no shared expert)."""
    hidden, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    hd = cfg.get("head_dim") or hidden // n_heads
    rot, eps = rotary_dim(cfg, hd), cfg["rms_norm_eps"]
    clip = cfg.get("clip_qkv")

    def layer(W, i, x, positions, allowed):
        p = f"model.layers.{i}."
        b, length, _ = x.shape
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q, k, v = (h @ W[f"{p}self_attn.{n}_proj.weight"].T for n in "qkv")
        if clip:
            q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
        q = q.view(b, length, n_heads, hd).transpose(1, 2)
        k = k.view(b, length, n_kv, hd).transpose(1, 2)
        v = v.view(b, length, n_kv, hd).transpose(1, 2)
        if cfg.get("qk_layernorm"):
            assert W[p + "self_attn.q_norm.weight"].shape == (hd,), "q_norm expected per head [head_dim]"
            q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, W[p + "self_attn.k_norm.weight"], eps)
        q = apply_partial_rope(q, positions, rot, cfg["rope_theta"])
        k = apply_partial_rope(k, positions, rot, cfg["rope_theta"])
        h = x + attention(q, k, v, allowed, n_heads, n_kv) @ W[p + "self_attn.o_proj.weight"].T
        return h + moe(rms_norm(h, W[p + "post_attention_layernorm.weight"], eps), W, p + "mlp.", cfg)

    return _forward(weights, cfg, input_ids, attention_mask, visible, "model.embed_tokens.weight", layer)


# -------------------------------------------------------------------------------------- tiny checkpoint writers
def tiny_llada2_config(**overrides) -> dict:
    cfg = dict(
        model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"], vocab_size=96, hidden_size=32,
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=8, num_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, score_function="sigmoid", norm_topk_prob=True,
        moe_router_enable_expert_bias=True, router_dtype="fp32", first_k_dense_replace=1,
        partial_rotary_factor=0.5, rotary_dim=4, rope_theta=600000, rope_scaling=None, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=False, use_bias=False, use_qkv_bias=False,
        use_qk_norm=True, pad_token_id=95, eos_token_id=94, mask_token_id=93, torch_dtype="float32")
    cfg.update(overrides)
    return cfg


def tiny_llada_moe_config(**overrides) -> dict:
    cfg = dict(
        model_type="lladamoe", architectures=["LLaDAMoEModelLM"], vocab_size=96, hidden_size=32,
        dense_intermediate_size=64, expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, qk_layernorm=True,
        moe_router_score_function="softmax", moe_router_enable_expert_bias=False, norm_topk_prob=False,
        routed_scaling_factor=1, rope_theta=50000, rope_scaling=None, partial_rotary_factor=1.0,
        rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False,
        clip_qkv=None, eos_token_id=94, pad_token_id=94, mask_token_id=93)
    cfg.update(overrides)
    return cfg


def _shapes(cfg: dict):
    """(name, shape, kind) of every tensor in the per-expert layout; kind: "matrix", "norm" or "bias"."""
    hidden, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    hd = cfg.get("head_dim") or hidden // n_heads
    vocab, n_exp = cfg["vocab_size"], cfg["num_experts"]
    llada2 = _is_llada2(cfg)

    def ffn(prefix, width):
        yield prefix + "gate_proj.weight", (width, hidden), "matrix"
        yield prefix + "up_proj.weight", (width, hidden), "matrix"
        yield prefix + "down_proj.weight", (hidden, width), "matrix"

    yield ("model.word_embeddings.weight" if llada2 else "model.embed_tokens.weight"), (vocab, hidden), "matrix"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,), "norm"
        if llada2:
            yield p + "attention.query_key_value.weight", ((n_heads + 2 * n_kv) * hd, hidden), "matrix"
            if cfg.get("use_qk_norm", True):
                yield p + "attention.query_layernorm.weight", (hd,), "norm"
                yield p + "attention.key_layernorm.weight", (hd,), "norm"
            yield p + "attention.dense.weight", (hidden, n_heads * hd), "matrix"
        else:
            yield p + "self_attn.q_proj.weight", (n_heads * hd, hidden), "matrix"
            yield p + "self_attn.k_proj.weight", (n_kv * hd, hidden), "matrix"
            yield p + "self_attn.v_proj.weight", (n_kv * hd, hidden), "matrix"
            yield p + "self_attn.o_proj.weight", (hidden, n_heads * hd), "matrix"
            if cfg.get("qk_layernorm"):
                yield p + "self_attn.q_norm.weight", (hd,), "norm"
                yield p + "self_attn.k_norm.weight", (hd,), "norm"
        yield p + "post_attention_layernorm.weight", (hidden,), "norm"
        if llada2 and i < cfg.get("first_k_dense_replace", 0):
            yield from ffn(p + "mlp.", cfg["intermediate_size"])
            continue
        width = cfg["moe_intermediate_size"] if llada2 else cfg["expert_intermediate_size"]
        yield p + "mlp.gate.weight", (n_exp, hidden), "matrix"
        if llada2 and cfg.get("moe_router_enable_expert_bias"):
            yield p + "mlp.gate.expert_bias", (n_exp,), "bias"
        for e in range(n_exp):
            yield from ffn(f"{p}mlp.experts.{e}.", width)
        if llada2 and cfg.get("num_shared_experts"):
            yield from ffn(p + "mlp.shared_experts.", width * cfg["num_shared_experts"])
    yield "model.norm.weight", (hidden,), "norm"
    yield "lm_head.weight", (vocab, hidden), "matrix"


def random_weights(cfg: dict, seed: int, layout: str = "per_expert") -> dict[str, np.ndarray]:
    """float32 random weights for either family. The "merged" layout (llada2 only) stacks the very same experts,
    so a seed gives the same model in both layouts."""
    rng = np.random.default_rng(seed)
    draw = {"matrix": lambda s: 0.2 * rng.standard_normal(s), "norm": lambda s: 1 + 0.1 * rng.standard_normal(s),
            "bias": lambda s: 0.05 * rng.standard_normal(s)}
    weights = {name: draw[kind](shape).astype(np.float32) for name, shape, kind in _shapes(cfg)}
    if layout == "per_expert":
        return weights
    assert layout == "merged" and _is_llada2(cfg), (layout, cfg.get("model_type"))
    merged = {}
    for name, value in weights.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+_proj)\.weight", name)
        if m is None:
            merged[name] = value
        elif m[2] == "0":
            merged[f"{m[1]}.{m[3]}"] = np.stack(
                [weights[f"{m[1]}.{e}.{m[3]}.weight"] for e in range(cfg["num_experts"])])  # [E, out, in]
    return merged


def merged_to_per_expert(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """dFactory's stacked experts ("...mlp.experts.gate_proj" [E, out, in]) as per-expert ".weight" keys;
    a per-expert dict comes back unchanged."""
    out = {}
    for name, value in weights.items():
        m = _MERGED.fullmatch(name)
        if m is None:
            out[name] = value
        else:
            for e in range(value.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.weight"] = value[e]
    return out


def write_hf_dir(path, cfg: dict, weights: dict[str, np.ndarray], shards: int = 1) -> None:
    """config.json plus model.safetensors, or `shards` files with model.safetensors.index.json. Merged-expert
    weights make the written model_type "llada2_moe_veomni"."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(cfg)
    if any(_MERGED.fullmatch(name) for name in weights):
        cfg["model_type"] = "llada2_moe_veomni"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {name: np.ascontiguousarray(value) for name, value in weights.items()}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for s, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({names[j]: file for j in part})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
