"""`config.json` of the Mixture-of-Experts LLaDA families <-> `LLaDAConfig`.

Two published layouts are read:

* LLaDA 2.x (`model_type` "llada2_moe"; dFactory's merged-expert checkpoints "llada2_moe_veomni"): inclusionAI's
  LLaDA2.0-mini / -flash and LLaDA 2.1 (the Ling / Bailing MoE field names: hidden_size, intermediate_size,
  moe_intermediate_size, num_experts, num_experts_per_tok, num_shared_experts, first_k_dense_replace, n_group,
  topk_group, score_function, routed_scaling_factor, norm_topk_prob, moe_router_enable_expert_bias,
  partial_rotary_factor / rotary_dim, use_qk_norm, use_qkv_bias).
* LLaDA-MoE-7B-A1B (`model_type` "lladamoe" / "llada_moe", or "llada" with experts): OLMoE's names
  (dense_intermediate_size, expert_intermediate_size, qk_layernorm, moe_router_score_function, moe_layer_freq).

An import refuses by name every field whose value selects a network this project does not implement (rope
scaling, biases on every projection, another activation, a sliding window, ...), as `hf_config` does for LLaDA.
The export writes the LLaDA 2.x layout (every MoE model this project holds fits it) with this project's PyTorch
code (`hf_files/modeling_llada2_moe.py`) named in auto_map; a config.json the model was imported from in that
layout keeps its other fields.

The published LLaDA 2.x files name no mask token: the ids come from config.json when it has them (this
project's exports write them), else the published tokenizer's (mask 156895, EOS / pad 156892) when the
vocabulary is that tokenizer's 157184 tokens; any other vocabulary without ids is an error naming the field.
"""

from __future__ import annotations

from typing import Any

from llada_jax.config import DTYPES, LLaDAConfig
from llada_jax.errors import HFConfigError

LLADA2_TYPES = ("llada2_moe", "llada2_moe_veomni")
LLADA_MOE_TYPES = ("lladamoe", "llada_moe")
LLADA2_AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}
MODELING_FILES = ("configuration_llada2_moe.py", "modeling_llada2_moe.py")
# The published tokenizer (157184 tokens): <|mask|> and <|endoftext|>, the EOS and padding of the generation code.
LING_VOCAB, LING_MASK, LING_EOS = 157184, 156895, 156892


def layout_of(d: dict[str, Any]) -> str | None:
    """The key-table layout (`hf_keys.TABLES`) of a Mixture-of-Experts config.json; None for another model."""
    model_type = d.get("model_type")
    if model_type == "llada2_moe_veomni":
        return "llada2_merged"
    if model_type in LLADA2_TYPES:
        return "llada2"
    if model_type in LLADA_MOE_TYPES or (model_type == "llada" and "num_experts" in d and "hidden_size" in d):
        return "llada_moe"
    return None


def _refuse(source: str, d: dict, field: str, accepted: tuple, meaning: str) -> None:
    value = d.get(field, accepted[0])
    if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
        raise HFConfigError(f"{source}: {field}={value!r} is not supported (this project implements {meaning})")


def _int(source: str, d: dict, field: str, default=None) -> int:
    value = d.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HFConfigError(f"{source}: needs an integer {field!r}, got {value!r}")
    return value


def _ids(source: str, d: dict, vocab: int) -> dict[str, int | None]:
    """mask / EOS / pad ids: config.json's, else the published tokenizer's (see the module docstring)."""
    ids = {name: d.get(name) for name in ("mask_token_id", "eos_token_id", "pad_token_id")}
    if ids["eos_token_id"] is None and ids["pad_token_id"] is not None:
        ids["eos_token_id"] = ids["pad_token_id"]  # the published files give pad only; generation's EOS is it
    if vocab == LING_VOCAB:
        defaults = {"mask_token_id": LING_MASK, "eos_token_id": LING_EOS, "pad_token_id": LING_EOS}
        ids = {name: defaults[name] if value is None else value for name, value in ids.items()}
    if ids["mask_token_id"] is None:
        raise HFConfigError(f"{source}: no mask_token_id, and the vocabulary ({vocab} tokens) is not the published "
                            f"LLaDA 2.x tokenizer's ({LING_VOCAB}): add mask_token_id to config.json")
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


def _rotary_factor(source: str, d: dict, head_dim: int) -> float:
    factor = d.get("partial_rotary_factor")
    rotary = d.get("rotary_dim")
    if rotary is not None and factor is not None and int(head_dim * factor) != rotary:
        raise HFConfigError(f"{source}: rotary_dim {rotary} and partial_rotary_factor {factor} disagree for "
                            f"head_dim {head_dim}")
    if factor is None:
        factor = 1.0 if rotary is None else rotary / head_dim
    return float(factor)


def from_moe_config(d: dict[str, Any], *, source: str = "config.json", **overrides) -> LLaDAConfig:
    """The LLaDAConfig of a LLaDA 2.x or LLaDA-MoE config.json. `overrides` set the JAX-side fields (and
    attention_type / block_size)."""
    layout = layout_of(d)
    if layout is None:
        raise HFConfigError(f"{source}: model_type {d.get('model_type')!r} is not a Mixture-of-Experts LLaDA")
    _refuse(source, d, "rope_scaling", (None,), "plain RoPE: rope_scaling must be null")
    _refuse(source, d, "hidden_act", ("silu",), "SiLU-gated MLPs")
    _refuse(source, d, "tie_word_embeddings", (False, True), "a tied or untied output head")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts",
                  "num_experts_per_tok"):
        _int(source, d, field)
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise HFConfigError(f"{source}: head_dim {head_dim} x num_attention_heads {heads} is not hidden_size "
                            f"{hidden} (this project derives head_dim from them)")
    fields: dict[str, Any] = dict(
        d_model=hidden, n_layers=d["num_hidden_layers"], n_heads=heads,
        n_kv_heads=d.get("num_key_value_heads") or heads, vocab_size=d["vocab_size"],
        max_sequence_length=_int(source, d, "max_position_embeddings", 4096),
        rope_theta=float(d.get("rope_theta", 10000.0)), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        weight_tying=bool(d.get("tie_word_embeddings", False)), bos_token_id=None,
        partial_rotary_factor=_rotary_factor(source, d, head_dim), num_experts=d["num_experts"],
        experts_per_token=d["num_experts_per_tok"], router_norm_topk=bool(d.get("norm_topk_prob") or False),
        router_scale=float(d.get("routed_scaling_factor") or 1.0),
        **_ids(source, d, d["vocab_size"]),
    )
    if layout == "llada_moe":
        fields.update(_llada_moe_fields(source, d))
    else:
        fields.update(_llada2_fields(source, d))
    fields.update(attention_type=d.get("attention_type", fields.pop("attention_type", "bidirectional")),
                  block_size=d.get("block_size", fields.pop("block_size", None)))
    fields.update(overrides)
    if fields["attention_type"] != "block_causal":
        fields["block_size"] = None
    try:
        return LLaDAConfig(**fields)
    except (TypeError, ValueError) as e:
        raise HFConfigError(f"{source}: {e}") from e


def _llada2_fields(source: str, d: dict) -> dict[str, Any]:
    _refuse(source, d, "use_bias", (False,), "no biases outside query_key_value: use_bias must be false")
    _refuse(source, d, "use_rmsnorm", (True,), "RMSNorm")
    _refuse(source, d, "norm_head", (False,), "an unnormalised output head")
    _refuse(source, d, "norm_softmax", (False,), "plain attention softmax")
    _refuse(source, d, "using_split_qkv_in_self_attention", (False,), "the fused query_key_value weights")
    _refuse(source, d, "use_sliding_window", (False,), "full attention: use_sliding_window must be false")
    _refuse(source, d, "router_dtype", ("fp32", "float32", None), "a float32 router")
    _refuse(source, d, "num_nextn_predict_layers", (0, None), "no multi-token prediction layers")
    _refuse(source, d, "score_function", ("sigmoid", "softmax"), "sigmoid or softmax router scores")
    return dict(
        mlp_hidden_size=_int(source, d, "intermediate_size"),
        expert_hidden_size=_int(source, d, "moe_intermediate_size"),
        num_shared_experts=d.get("num_shared_experts") or 0,
        first_dense_layers=d.get("first_k_dense_replace") or 0,
        include_qkv_bias=bool(d.get("use_qkv_bias", False)), qk_norm=bool(d.get("use_qk_norm", True)),
        router_score=d.get("score_function", "sigmoid"),
        router_expert_bias=bool(d.get("moe_router_enable_expert_bias", False)),
        router_groups=d.get("n_group") or 1, router_topk_groups=d.get("topk_group") or 1,
        # LLaDA 2.x decodes (and its SFT trains) block by block, each block seeing the blocks before it
        attention_type="block_causal", block_size=32,
    )


def _llada_moe_fields(source: str, d: dict) -> dict[str, Any]:
    _refuse(source, d, "attention_bias", (False,), "no attention biases")
    _refuse(source, d, "clip_qkv", (None,), "no q/k/v clipping")
    _refuse(source, d, "shared_expert_intermediate_size", (None, 0), "LLaDA-MoE without shared experts")
    _refuse(source, d, "moe_router_enable_expert_bias", (False,), "LLaDA-MoE's router without an expert bias")
    _refuse(source, d, "router_num_group", (None, 1), "LLaDA-MoE's router over all experts")
    _refuse(source, d, "moe_router_score_function", ("softmax", "sigmoid"), "softmax or sigmoid router scores")
    freq = d.get("moe_layer_freq")
    if freq is not None and any(f != 1 for f in freq):
        raise HFConfigError(f"{source}: moe_layer_freq={freq!r} is not supported (this project implements every "
                            f"layer Mixture-of-Experts for LLaDA-MoE)")
    return dict(
        mlp_hidden_size=_int(source, d, "dense_intermediate_size", d.get("intermediate_size")),
        expert_hidden_size=_int(source, d, "expert_intermediate_size"),
        qk_norm=bool(d.get("qk_layernorm", True)), router_score=d.get("moe_router_score_function", "softmax"),
    )


def to_moe_config(config: LLaDAConfig, torch_dtype: str, base: dict | None = None) -> dict[str, Any]:
    """The LLaDA 2.x config.json of `config` (weights in `torch_dtype`), with this project's modeling code in
    auto_map; `base` (a LLaDA 2.x config.json the model was imported from) keeps its other fields."""
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {DTYPES}, got {torch_dtype!r}")
    c = config
    out = dict(base) if base is not None and base.get("model_type") in LLADA2_TYPES else {}
    out.update({
        "model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"], "auto_map": LLADA2_AUTO_MAP,
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.effective_n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.padded_vocab_size,
        "intermediate_size": c.mlp_hidden_size, "max_position_embeddings": c.max_sequence_length,
        "rope_theta": c.rope_theta, "rope_scaling": None, "rms_norm_eps": c.rms_norm_eps,
        "partial_rotary_factor": c.partial_rotary_factor, "rotary_dim": c.rotary_dim, "use_qk_norm": c.qk_norm,
        "use_qkv_bias": c.include_qkv_bias, "use_bias": False, "hidden_act": "silu",
        "tie_word_embeddings": c.weight_tying, "router_dtype": "fp32",
        "num_experts": c.num_experts, "num_experts_per_tok": c.experts_per_token,
        "moe_intermediate_size": c.expert_hidden_size, "num_shared_experts": c.num_shared_experts,
        "first_k_dense_replace": c.first_dense_layers if c.is_moe else c.n_layers,
        "score_function": c.router_score, "moe_router_enable_expert_bias": c.router_expert_bias,
        "n_group": c.router_groups, "topk_group": c.router_topk_groups, "norm_topk_prob": c.router_norm_topk,
        "routed_scaling_factor": c.router_scale, "mask_token_id": c.mask_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id, "attention_type": c.attention_type, "torch_dtype": torch_dtype,
    })
    if c.block_size is not None:
        out["block_size"] = c.block_size
    else:
        out.pop("block_size", None)
    if "dtype" in out:
        out["dtype"] = torch_dtype
    return dict(sorted(out.items()))
