"""LoRA checkpoints <-> PEFT LoRA adapter directories (`convert to-hf --adapter_only`, `convert from-hf --adapter`).

A PEFT adapter directory holds

    adapter_config.json        peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors  per block and target: `base_model.model.<module>.lora_A.weight` [r, in] and
                               `.lora_B.weight` [out, r], <module> = model.transformer.blocks.{i}.{target}

and applies (`peft.PeftModel.from_pretrained(base, dir)`) to the exported base model, whose projections are
PyTorch Linears named as the official checkpoint's. Our adapter matrices are already PEFT's, transposed: A
[in, r] and B [r, out] with a flattened head dimension heads-major (see `llada_jax.lora`), the scale
lora_alpha / r in both. `target_modules` is written as a regex that matches the blocks' projections only: a
plain list holding "ff_out" would also match the output head `model.transformer.ff_out`.

Importing takes the settings this project's LoRA has (one rank and alpha for every adapted projection of every
block, no bias, no DoRA / rsLoRA, no extra trained modules) and reports any other as an error naming the field,
before anything is written.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from llada_jax import lora as lora_lib
from llada_jax.checkpoints import layout, storage
from llada_jax.config import LORA_TARGETS, LLaDAConfig, LoRAConfig
from llada_jax.errors import (
    CheckpointNotFoundError,
    HFConfigError,
    UsageError,
    WeightsError,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model (LLaDAModelLM)
BLOCK_MODULE = "model.transformer.blocks.{layer}.{target}"
# Modules of the exported PyTorch model outside the blocks that PEFT could adapt: not supported here.
OTHER_MODULES = {"model.transformer.ff_out": "the output head", "model.transformer.wte": "the embedding"}
_KEY = re.compile(r"base_model\.model\.model\.transformer\.blocks\.(\d+)\.(\w+)\.lora_([AB])\.weight")

# PEFT settings this project's LoRA does not have: field -> the values that mean "off".
UNSUPPORTED = {
    "use_dora": (None, False), "use_rslora": (None, False), "fan_in_fan_out": (None, False),
    "modules_to_save": (None, []), "rank_pattern": (None, {}), "alpha_pattern": (None, {}),
    "layers_to_transform": (None, []), "exclude_modules": (None, [], ""), "layer_replication": (None, []),
    "lora_bias": (None, False), "target_parameters": (None, []), "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []), "use_qalora": (None, False), "megatron_config": (None, {}),
}


def module_name(layer: int, target: str) -> str:
    return BLOCK_MODULE.format(layer=layer, target=target)


def weight_key(layer: int, target: str, which: str) -> str:
    """The adapter file's key of lora_A ("A") or lora_B ("B") of one block's projection."""
    return f"{PREFIX}{module_name(layer, target)}.lora_{which}.weight"


def target_modules_regex(targets) -> str:
    """A `target_modules` regex (PEFT full-matches it against module names) for the blocks' `targets`."""
    return r"model\.transformer\.blocks\.\d+\.(" + "|".join(targets) + ")"


# --- export --------------------------------------------------------------------------------------------------------


def adapter_config(lora: LoRAConfig, base: str | None, targets: tuple[str, ...]) -> dict:
    """adapter_config.json of a LoRA checkpoint (fields PEFT >= 0.13 knows; the others keep PEFT's defaults)."""
    alpha = float(lora.alpha)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "revision": None,
        "inference_mode": True, "r": lora.rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(lora.dropout), "target_modules": target_modules_regex(targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft_adapter(input_path: str, output_dir: str, *, overwrite: bool = False) -> str:
    """Write a LoRA checkpoint's adapters as a PEFT LoRA adapter directory (float32), atomically."""
    from safetensors.numpy import save_file

    from llada_jax.checkpoints.adapters import per_layer, read_lora_step
    from llada_jax.checkpoints.atomic import atomic_dir, write_json

    run_dir, _, lora, base, trained_on, adapters = read_lora_step(input_path)
    if storage.clean(output_dir) in (storage.clean(input_path), run_dir):
        raise ValueError(f"{output_dir}: the output must differ from the input checkpoint")
    layers = per_layer(adapters, lora, trained_on)
    if trained_on.is_moe or lora_layout(trained_on) == "llada2":
        tensors, config = llada2_adapter(layers, lora, trained_on)
        config["base_model_name_or_path"] = peft_base(base)
    else:
        tensors = {}
        for target in lora_lib.present_targets(trained_on, lora):
            for i, (a, b) in enumerate(layers[target]):
                tensors[weight_key(i, target, "A")] = np.ascontiguousarray(a.T)  # [r, in]
                tensors[weight_key(i, target, "B")] = np.ascontiguousarray(b.T)  # [out, r]
        config = adapter_config(lora, peft_base(base), lora_lib.present_targets(trained_on, lora))
    with atomic_dir(output_dir, overwrite=overwrite, last=(ADAPTER_CONFIG,)) as tmp:
        save_file(tensors, f"{tmp}/{ADAPTER_WEIGHTS}", metadata={"format": "pt"})
        write_json(f"{tmp}/{ADAPTER_CONFIG}", config)
    return storage.clean(output_dir)


def lora_layout(config: LLaDAConfig) -> str:
    """The exported model's layout the adapters apply to: "llada2" (Mixture of Experts, QK-norm, partial rotary)
    or "llada"."""
    return "llada2" if config.is_moe or config.qk_norm or config.partial_rotary_factor != 1.0 else "llada"


# Our targets -> the exported LLaDA 2.x model's module (inside model.layers.{i}); q / k / v share the fused
# query_key_value.
LLADA2_MODULES = {
    "q_proj": "attention.query_key_value", "k_proj": "attention.query_key_value",
    "v_proj": "attention.query_key_value", "attn_out": "attention.dense", "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj", "shared_gate": "mlp.shared_experts.gate_proj",
    "shared_up": "mlp.shared_experts.up_proj", "shared_down": "mlp.shared_experts.down_proj",
}
QKV = ("q_proj", "k_proj", "v_proj")


def llada2_adapter(layers: dict, lora: LoRAConfig, config: LLaDAConfig) -> tuple[dict[str, np.ndarray], dict]:
    """(adapter tensors, adapter_config.json) of adapters on a model exported in the LLaDA 2.x layout.

    The exported query_key_value is one Linear, so the q / k / v adapters become one of rank m * r (m of them
    targeted): A is theirs stacked [m r, d], B block-diagonal [(n + 2k) hd, m r] (each part's rows from its own
    adapter, zero elsewhere), and rank_pattern / alpha_pattern give that module m r and m alpha, keeping the scale
    alpha / r. The output is the sum of the three adapters' outputs, exactly (the dropout, training only, is then
    one mask for the three). Other projections map one to one; the routed experts carry none."""
    c = config
    hd = c.head_dim
    heights = {"q_proj": c.n_heads * hd, "k_proj": c.effective_n_kv_heads * hd, "v_proj": c.effective_n_kv_heads * hd}
    qkv = [t for t in QKV if t in layers]
    tensors: dict[str, np.ndarray] = {}
    for i in range(c.n_layers):
        def key(module: str, which: str) -> str:
            return f"{PREFIX}model.layers.{i}.{module}.lora_{which}.weight"

        for target, pairs in layers.items():
            if target in QKV or pairs[i] is None:
                continue
            a, b = pairs[i]
            tensors[key(LLADA2_MODULES[target], "A")] = np.ascontiguousarray(a.T)
            tensors[key(LLADA2_MODULES[target], "B")] = np.ascontiguousarray(b.T)
        if qkv:
            rank = lora.rank
            fused_b = np.zeros((sum(heights.values()), rank * len(qkv)), np.float32)
            offsets = {"q_proj": 0, "k_proj": heights["q_proj"], "v_proj": heights["q_proj"] + heights["k_proj"]}
            for j, target in enumerate(qkv):
                b = layers[target][i][1]  # [r, rows]
                fused_b[offsets[target]: offsets[target] + heights[target], j * rank:(j + 1) * rank] = b.T
            tensors[key("attention.query_key_value", "A")] = np.ascontiguousarray(
                np.concatenate([layers[t][i][0].T for t in qkv]))
            tensors[key("attention.query_key_value", "B")] = fused_b
    modules = sorted({LLADA2_MODULES[t].replace(".", r"\.") for t in layers})
    cfg = adapter_config(lora, None, ())
    cfg["target_modules"] = r"model\.layers\.\d+\.(" + "|".join(modules) + ")"
    if len(qkv) > 1:
        cfg["rank_pattern"] = {"query_key_value": lora.rank * len(qkv)}
        alpha = float(lora.alpha) * len(qkv)
        cfg["alpha_pattern"] = {"query_key_value": int(alpha) if alpha.is_integer() else alpha}
    return tensors, cfg


def peft_base(base: str) -> str | None:
    """`base_model_name_or_path` of an exported adapter: the base when PEFT can load it as it is (a Hugging Face
    directory in the LLaDA layout), else None: the adapter then applies to the `convert to-hf` export of the base
    (an Orbax run, an autoregressive directory with other module names, or another LoRA run)."""
    from llada_jax.checkpoints.hf_import import read_config

    if layout.model_format(base) != "hf" or read_config(storage.clean(base))[2] is not None:
        return None
    return base


# --- import --------------------------------------------------------------------------------------------------------


def read_adapter_config(directory: str) -> dict:
    path = storage.join(directory, ADAPTER_CONFIG)
    if not storage.is_dir(directory):
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    if not storage.exists(path):
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    from llada_jax.checkpoints.hf_config import read_json_object

    return read_json_object(path)


def lora_settings(cfg: dict, source: str) -> tuple[int, float, float]:
    """(r, lora_alpha, lora_dropout) of a PEFT LoRA config, every unsupported setting an error naming its field."""
    if cfg.get("peft_type") != "LORA":
        raise HFConfigError(f"{source}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters can be imported")
    for field, off in UNSUPPORTED.items():
        if field in cfg and cfg[field] not in off:
            raise HFConfigError(f"{source}: {field}={json.dumps(cfg[field])} is not supported (LoRA here has one "
                                f"rank and alpha for every adapted projection of every block, no bias, no DoRA or "
                                f"rsLoRA scaling, no other trained modules)")
    if cfg.get("bias", "none") != "none":
        raise HFConfigError(f"{source}: bias={cfg['bias']!r} is not supported (LoRA here trains no biases); "
                            f"expected 'none'")
    values = {}
    for field, default in (("r", 8), ("lora_alpha", 8), ("lora_dropout", 0.0)):
        value = cfg.get(field, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise HFConfigError(f"{source}: {field}={json.dumps(value)}: expected a number")
        values[field] = value
    if not isinstance(values["r"], int) or values["r"] <= 0:
        raise HFConfigError(f"{source}: r={values['r']}: expected a positive integer")
    return values["r"], float(values["lora_alpha"]), float(values["lora_dropout"])


def mapped_targets(target_modules, config: LLaDAConfig, source: str) -> tuple[str, ...]:
    """Our targets (in LORA_TARGETS order) for PEFT's `target_modules`: a list of module names (PEFT adapts
    every module whose name is one of them or ends in ".<it>") or a regex it full-matches."""
    if isinstance(target_modules, str):
        names = {module_name(i, t): (i, t) for i in range(config.n_layers) for t in LORA_TARGETS}
        for other, what in OTHER_MODULES.items():
            if re.fullmatch(target_modules, other):
                raise HFConfigError(f"{source}: target_modules {target_modules!r} also matches {other} ({what}); "
                                    f"only the blocks' projections ({', '.join(LORA_TARGETS)}) can be adapted")
        hit = {t: [i for (name, (i, tt)) in names.items() if tt == t and re.fullmatch(target_modules, name)]
               for t in LORA_TARGETS}
        partial = [t for t, layers in hit.items() if layers and len(layers) != config.n_layers]
        if partial:
            raise HFConfigError(f"{source}: target_modules {target_modules!r} matches {partial[0]} in blocks "
                                f"{hit[partial[0]]} only, not in all {config.n_layers}: adapting a subset of the "
                                f"layers is not supported")
        targets = [t for t, layers in hit.items() if layers]
        if not targets:
            raise HFConfigError(f"{source}: target_modules {target_modules!r} matches none of the blocks' "
                                f"projections ({', '.join(LORA_TARGETS)})")
        return tuple(targets)
    if not isinstance(target_modules, list) or not target_modules:
        raise HFConfigError(f"{source}: target_modules={json.dumps(target_modules)}: expected a non-empty list of "
                            f"module names or a regex string")
    unknown = [m for m in target_modules if m not in LORA_TARGETS]
    if unknown:
        raise HFConfigError(f"{source}: target_modules names {unknown[0]!r}, which is not one of the blocks' "
                            f"projections LoRA can adapt here ({', '.join(LORA_TARGETS)})")
    return tuple(t for t in LORA_TARGETS if t in target_modules)


def read_adapter_weights(directory: str) -> tuple[str, dict[str, np.ndarray]]:
    from safetensors import safe_open

    from llada_jax.checkpoints import safetensors_io  # noqa: F401  (ml_dtypes: bfloat16 for numpy)

    path = storage.join(directory, ADAPTER_WEIGHTS)
    if not storage.exists(path):
        others = [f for f in storage.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {', '.join(others)}; only safetensors adapters are supported)" if others else ""
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}{hint}")
    local = storage.local_copy(path) if storage.is_url(path) else path
    try:
        with safe_open(local, framework="np") as f:
            return path, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    except Exception as e:  # a malformed file, a dtype numpy lacks
        raise WeightsError(f"{path}: cannot read the adapter weights ({e})") from e


def check_weights(weights: dict[str, np.ndarray], path: str, config: LLaDAConfig, rank: int,
                  targets: tuple[str, ...], base: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{target: (A [layers, in, r], B [layers, r, out]) float32} from the adapter file, every key and shape
    checked against the base model's config."""
    from llada_jax.checkpoints.safetensors_io import short_list
    from llada_jax.lora import target_layout

    layers_found = {int(m.group(1)) for m in map(_KEY.fullmatch, weights) if m}
    if layers_found and max(layers_found) + 1 != config.n_layers:
        raise WeightsError(f"{path}: the adapters cover blocks 0..{max(layers_found)}, but the base model {base} has "
                           f"n_layers={config.n_layers}: not the base of these adapters")
    expected = {weight_key(i, t, w) for i in range(config.n_layers) for t in targets for w in "AB"}
    unexpected = sorted(k for k in weights if k not in expected)
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor(s) {short_list(unexpected)}: only lora_A / lora_B of the "
                           f"blocks' projections {', '.join(targets)} (target_modules) can be imported")
    missing = sorted(expected - set(weights))
    if missing:
        raise WeightsError(f"{path}: missing tensor(s) {short_list(missing)} (target_modules names "
                           f"{', '.join(targets)} in every block)")
    out = {}
    for t in targets:
        in_dims, _, out_dims, _ = target_layout(config, t)
        want = {"A": (rank, math.prod(in_dims)), "B": (math.prod(out_dims), rank)}
        stacks = {}
        for w in "AB":
            arrays = []
            for i in range(config.n_layers):
                key = weight_key(i, t, w)
                array = weights[key]
                if tuple(array.shape) != want[w]:
                    raise WeightsError(
                        f"{path}: {key} has shape {list(array.shape)}, but r={rank} and the base model {base} "
                        f"(d_model={config.d_model}, n_heads={config.n_heads}, n_kv_heads={config.effective_n_kv_heads}, "
                        f"mlp_hidden_size={config.mlp_hidden_size}) need {list(want[w])}")
                if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
                    raise WeightsError(f"{path}: {key} has dtype {array.dtype}; expected a float dtype")
                arrays.append(np.asarray(array, np.float32).T)  # A [in, r], B [r, out]
            stacks[w] = np.stack(arrays)
        out[t] = (stacks["A"], stacks["B"])
    return out


def import_peft_adapter(adapter_dir: str, output_dir: str, *, base: str | None = None,
                        overwrite: bool = False) -> str:
    """Write a PEFT LoRA adapter directory as a LoRA checkpoint of the base model `base` (default: its
    adapter_config.json's base_model_name_or_path), with the base's tokenizer. Everything is checked first;
    the run is built in a temporary directory and renamed into place."""
    from llada_jax.checkpoints.adapters import save_adapters
    from llada_jax.checkpoints.atomic import atomic_dir
    from llada_jax.checkpoints.loading import model_tokenizer, read_model_config

    directory = storage.clean(adapter_dir)
    cfg = read_adapter_config(directory)
    source = storage.join(directory, ADAPTER_CONFIG)
    rank, alpha, dropout = lora_settings(cfg, source)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{source}: base_model_name_or_path is not set: name the base model with --input")
    if not storage.exists(base):
        raise CheckpointNotFoundError(f"the base model {base} (--input, or base_model_name_or_path of {source}) "
                                      f"is not found")
    if storage.clean(output_dir) in (directory, storage.clean(base)):
        raise ValueError(f"{output_dir}: the output must differ from the adapter directory and the base model")
    config = read_model_config(base)
    targets = mapped_targets(cfg.get("target_modules"), config, source)
    try:
        lora = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    except ValueError as e:  # named by PEFT's fields
        message = str(e)
        for ours, peft in (("lora.rank", "r"), ("lora.alpha", "lora_alpha"), ("lora.dropout", "lora_dropout"),
                           ("lora.targets", "target_modules")):
            message = message.replace(ours + ":", peft + ":")
        raise HFConfigError(f"{source}: {message}") from e
    path, weights = read_adapter_weights(directory)
    stacks = check_weights(weights, path, config, rank, targets, base)
    del weights
    adapters = {"blocks": {"adapters": {t: {"lora_a": a, "lora_b": b} for t, (a, b) in stacks.items()}}}
    tokenizer = model_tokenizer(base)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        save_adapters(tmp, adapters, config.replace(scan_layers=True), lora, base, tokenizer_dir=tokenizer)
    return storage.clean(output_dir)
