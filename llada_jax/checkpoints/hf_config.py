"""`config.json` of the official Hugging Face LLaDA layout <-> `LLaDAConfig`.

The official configuration class fills every field missing from config.json with OLMo/GPT-2 defaults
(rope off, tied weights, a sequential block, 50304 embeddings, dropouts 0.1), so an export writes every field
the official code reads, with the values of GSAI-ML/LLaDA-8B-Base (dropouts 0.0). An import checks the fields
that select a different architecture than the one implemented here and refuses them by name; fields that do
not change the network (dropouts, init_*, precision, flash_attention, ...) are ignored, and the whole
config.json is kept with the Orbax checkpoint so that an export writes it back unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from llada_jax.checkpoints import storage
from llada_jax.checkpoints.layout import HF_CONFIG_FILE
from llada_jax.config import DTYPES, LLaDAConfig
from llada_jax.errors import HFConfigError

MODEL_TYPE = "llada"
AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}

# Fields of the official config that do not depend on the model's shape, with the official 8B values.
FIXED_FIELDS: dict[str, Any] = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": AUTO_MAP,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "include_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mlp_ratio": 4,  # unused: mlp_hidden_size is always written
    "model_type": MODEL_TYPE,
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope": True,
    "rope_full_precision": True,
    "scale_logits": False,
    "use_cache": False,
}

# LLaDAConfig fields written under the same name.
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
                "max_sequence_length", "rope_theta", "rms_norm_eps", "weight_tying",
                "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")

# LLaDAConfig fields that select a model type, written under the same name: include_qkv_bias is the official
# field (q/k/v biases, Qwen2); attention_type, shift_logits and block_size are this project's (an imported AR
# model, Dream, block diffusion), read by its modeling code and import, unknown to the official code, which reads
# any model as bidirectional. block_size is written for a block_causal model only (absent: None).
MODEL_TYPE_FIELDS = ("include_qkv_bias", "attention_type", "shift_logits", "block_size")

# Official fields whose value changes the network: (field, the official default when absent, accepted
# values, what this project implements). Anything else is refused on import.
_REQUIRED_VALUES = (
    ("block_type", "sequential", ("llama",), "the LLaMA block with separate q/k/v and a SwiGLU MLP"),
    ("activation_type", "swiglu", ("silu",), "SiLU gating in the MLP"),
    ("layer_norm_type", "default", ("rms",), "RMSNorm"),
    ("rope", False, (True,), "rotary position embeddings"),
    ("alibi", False, (False,), "no ALiBi"),
    ("include_bias", False, (False,), "no biases"),
    ("bias_for_layer_norm", None, (False, None), "no norm biases"),
    ("layer_norm_with_affine", True, (True,), "norms with a weight"),
    ("attention_layer_norm", False, (False,), "no q/k norms"),
    ("input_emb_norm", False, (False,), "no embedding scaling"),
    ("scale_logits", False, (False,), "unscaled logits"),
    ("block_group_size", 1, (1,), "blocks stored as transformer.blocks.{i}"),
    ("clip_qkv", None, (None,), "no q/k/v clipping"),
)


def to_hf_config(config: LLaDAConfig, torch_dtype: str, base: dict | None = None) -> dict[str, Any]:
    """The official config.json for `config`, with weights stored in `torch_dtype`.

    `base` (the config.json a model was imported from) keeps its other fields and their spelling, so an
    HF -> Orbax -> HF round trip writes the same file; the shape and model-type fields always come from
    `config` (a field absent from the base stays absent while it keeps the meaning of its absence).
    """
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {DTYPES}, got {torch_dtype!r}")
    if base is None:
        out = dict(FIXED_FIELDS)
        out["tie_word_embeddings"] = config.weight_tying  # the generic transformers name of weight_tying
        version = _transformers_version()
        if version:
            out["transformers_version"] = version
    else:
        out = dict(base)
        # The export ships this project's modeling code, and the JAX model has no dropout.
        out.update({k: FIXED_FIELDS[k] for k in ("model_type", "architectures", "auto_map")})
        out.update({k: 0.0 for k in ("attention_dropout", "residual_dropout", "embedding_dropout")})
    implied = from_hf_config(base) if base is not None else None
    for name in SHAPE_FIELDS + MODEL_TYPE_FIELDS:
        value = getattr(config, name)
        if implied is None and name in ("bos_token_id", "block_size") and value is None:
            continue  # not an official field; block_size only for a block_causal model
        if implied is not None and getattr(implied, name) == value:
            # The base means the same: keep its spelling (500000 vs 500000.0, include_qkv_bias null) or the
            # field's absence (no bos_token_id, attention_type, shift_logits, block_size: a bidirectional LLaDA).
            continue
        out[name] = value
    if "tie_word_embeddings" in out:
        out["tie_word_embeddings"] = config.weight_tying
    out["torch_dtype"] = torch_dtype
    if "dtype" in out:  # transformers 5 writes `dtype`
        out["dtype"] = torch_dtype
    return dict(sorted(out.items()))


def from_hf_config(d: dict[str, Any], *, source: str = HF_CONFIG_FILE, **overrides) -> LLaDAConfig:
    """The LLaDAConfig of an official config.json (dict). `overrides` set the JAX-side fields."""
    model_type = d.get("model_type")
    if model_type != MODEL_TYPE:
        raise HFConfigError(f"{source}: model_type is {model_type!r}; only {MODEL_TYPE!r} (LLaDA) is supported")
    for field, default, accepted, meaning in _REQUIRED_VALUES:
        value = d.get(field, default)
        if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
            given = (f"{field}={value!r}" if field in d
                     else f"{field} is absent, which the official code reads as {default!r}, and")
            raise HFConfigError(f"{source}: {given} is not supported (this project implements {meaning}: "
                                f"{field} must be {' or '.join(json.dumps(a) for a in accepted)})")
    for field in ("d_model", "n_layers", "n_heads", "vocab_size"):
        if not isinstance(d.get(field), int) or isinstance(d.get(field), bool):
            raise HFConfigError(f"{source}: needs an integer {field!r}, got {d.get(field)!r}")
    n_kv_heads = d.get("n_kv_heads")
    if n_kv_heads is None and d.get("multi_query_attention"):
        n_kv_heads = 1
    mlp_hidden_size = d.get("mlp_hidden_size")
    if mlp_hidden_size is None:
        mlp_hidden_size = int(d.get("mlp_ratio", 4)) * d["d_model"]
    # Absent fields mean what they mean to the official code (its defaults), except the token ids below.
    embedding_size = d.get("embedding_size", 50304)
    padded = embedding_size or d["vocab_size"]
    defaults = LLaDAConfig()
    fields: dict[str, Any] = dict(
        d_model=d["d_model"], n_layers=d["n_layers"], n_heads=d["n_heads"], n_kv_heads=n_kv_heads,
        mlp_hidden_size=mlp_hidden_size, vocab_size=d["vocab_size"], embedding_size=embedding_size,
        max_sequence_length=d.get("max_sequence_length", 1024), rope_theta=float(d.get("rope_theta", 10000.0)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), weight_tying=bool(d.get("weight_tying", True)),
    )
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
        # Absent ids take this project's LLaDA defaults when they fit the vocabulary, not the official GPT-2
        # ones (50256); the official config has no bos_token_id. Explicit nulls stay null.
        if name in d:
            fields[name] = d[name]
        else:
            default = getattr(defaults, name)
            fields[name] = default if default is not None and default < padded else None
    include_qkv_bias = d.get("include_qkv_bias", False)
    fields.update(
        include_qkv_bias=False if include_qkv_bias is None else include_qkv_bias,  # the official Optional[bool]
        # This project's fields (see MODEL_TYPE_FIELDS): absent from an official config.json, a LLaDA model.
        attention_type=d.get("attention_type", "bidirectional"), shift_logits=d.get("shift_logits", False),
        block_size=d.get("block_size"),
    )
    fields.update(overrides)
    try:
        return LLaDAConfig(**fields)
    except (TypeError, ValueError) as e:
        raise HFConfigError(f"{source}: {e}") from e


def read_hf_config(directory: str) -> dict[str, Any]:
    path = storage.join(directory, HF_CONFIG_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{directory}: no {HF_CONFIG_FILE} (not a Hugging Face model directory)")
    return read_json_object(path)


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON file holding one object (config.json, adapter_config.json); HFConfigError naming the file otherwise."""
    try:
        d = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(d, dict):
        raise HFConfigError(f"{path}: expected a JSON object")
    return d


def _transformers_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
