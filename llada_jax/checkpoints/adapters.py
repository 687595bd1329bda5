"""LoRA checkpoints: a step that holds adapters only and names the base model they apply to.

A LoRA step (what a `--config.lora.enabled=true` run saves, and `convert from-hf --adapter` writes) holds

    params          the adapters alone: {"blocks": {"adapters": {target: {"lora_a", "lora_b"}}}} (per layer when
                    the layers are not scanned), float32
    model_config    the base model's LLaDAConfig (the architecture the adapters were trained on)
    lora            {"rank", "alpha", "dropout", "targets", "base"}: the LoRAConfig and the base model's path
                    (an Orbax run, a Hugging Face directory, a gs:// URL; a LoRA run as a base is merged first)

so it is a small fraction of the base. This module reads and writes such steps; loading one
(`loading.load_lora_model`, reached from every `--model`, `load_pretrained` and `load_model_and_tokenizer`) loads
the base as it is stored (any format, a LoRA run merged) and then `apply_adapters` here checks that the base's
shapes are those the adapters were trained on, restores the adapters into their shardings and returns the model
with adapters, which the loader folds into the weights with `merge_lora=True`.
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llada_jax import lora as lora_lib
from llada_jax import sharding
from llada_jax.checkpoints import layout, storage
from llada_jax.checkpoints.atomic import copy_dir
from llada_jax.checkpoints.orbax_model import (
    SHAPE_FIELDS,
    checkpoint_manager,
    model_items,
    relayout_blocks,
    restore_items,
    saved_config,
)
from llada_jax.config import ADAPTABLE_FIELDS, LLaDAConfig, LoRAConfig
from llada_jax.errors import CheckpointError, CheckpointNotFoundError, UsageError
from llada_jax.model import LLaDAForMaskedLM, abstract_model, layer_stack, layer_stacks


def lora_item(lora: LoRAConfig, base: str) -> dict:
    """The JSON of a step's `lora` item."""
    return {**lora.to_dict(), "base": base_reference(base)}


def base_reference(path: str) -> str:
    """How a base model is named in a LoRA checkpoint: an Orbax run pinned to its step (the latest finished one when
    `path` names the run, so a base run that trains on or drops old steps does not silently become another base),
    another path made absolute, a URL as it is."""
    if layout.model_format(path) == "orbax":
        return layout.step_dir(*layout.find_checkpoint(path))
    return storage.clean(path)


def read_lora(run_dir: str, step: int) -> tuple[LoRAConfig, str] | None:
    """(LoRAConfig, base path) of a LoRA step, None for a step that holds a whole model."""
    if not layout.is_lora_step(run_dir, step):
        return None
    item = dict(restore_items(run_dir, step, **{layout.LORA: ocp.args.JsonRestore()})[layout.LORA])
    base = item.pop("base")
    return LoRAConfig.from_dict(item, source=f"{layout.step_dir(run_dir, step)}: {layout.LORA}"), base


def adapter_target(config: LLaDAConfig, lora: LoRAConfig, mesh=None, rules=None) -> dict:
    """Pure dict of ShapeDtypeStructs with shardings: where a step's adapters are restored to."""
    _, state = abstract_model(config, lora)
    state = nnx.filter_state(state, nnx.LoRAParam)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    else:
        shardings = sharding.state_shardings(state, mesh, rules or sharding.current_rules())
    return nnx.to_pure_dict(jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state,
                                         shardings))


def restore_adapters(run_dir: str, step: int, lora: LoRAConfig, trained_on: LLaDAConfig, *, scan_layers=None,
                     mesh=None, rules=None) -> dict:
    """A LoRA step's adapters (pure dict, float32), placed on `mesh` (else one local device), in the layer layout
    `scan_layers` (default: as stored)."""
    target = adapter_target(trained_on, lora, mesh, rules)
    adapters = restore_items(run_dir, step, **{layout.PARAMS: ocp.args.StandardRestore(target)})[layout.PARAMS]
    if scan_layers is not None and scan_layers != trained_on.scan_layers:
        adapters = relayout_blocks(adapters, to_scanned=scan_layers, config=trained_on)
    return adapters


def require_base(where: str, base: str) -> None:
    """CheckpointNotFoundError naming a LoRA step's base model when it is not there."""
    if not storage.exists(base):
        raise CheckpointNotFoundError(f"{where}: the base model of these adapters, {base} (its `{layout.LORA}` "
                                      f"item), is not found")


def check_base(base: LLaDAConfig, trained_on: LLaDAConfig, where: str, base_path: str) -> None:
    """A CheckpointError naming the first shape field where the base differs from what the adapters were
    trained on."""
    for field in SHAPE_FIELDS:
        if getattr(base, field) != getattr(trained_on, field):
            raise CheckpointError(
                f"{where}: the adapters were trained on a base with {field}={getattr(trained_on, field)}, but the "
                f"base model {base_path} has {field}={getattr(base, field)}: not the base of these adapters")


def adapted_config(base: LLaDAConfig, trained_on: LLaDAConfig, **overrides) -> LLaDAConfig:
    """The config of the adapted model: the base's, with the ADAPTABLE_FIELDS the run trained with (a LoRA run may
    train a block-causal or shifted model on a bidirectional base), unless given in `overrides`."""
    return base.replace(**{f: overrides.get(f, getattr(trained_on, f)) for f in ADAPTABLE_FIELDS})


def with_adapters(base: LLaDAForMaskedLM, lora: LoRAConfig, adapters: dict, config: LLaDAConfig | None = None
                  ) -> LLaDAForMaskedLM:
    """A model of the base's parameters (shared, not copied) plus the given adapters (pure dict), of `config`
    (default: the base's)."""
    graphdef, state = abstract_model(config or base.config, lora)
    params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    for name, stack in adapters.items():  # each layer stack's (`blocks`, and a MoE model's `dense_blocks`)
        params[name] = _deep_merge(params[name], stack)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def apply_adapters(base_model: LLaDAForMaskedLM, run_dir: str, step: int, lora: LoRAConfig, base_path: str, *,
                   mesh=None, rules=None, **overrides) -> LLaDAForMaskedLM:
    """The loaded base model (`base_path`, for the errors) with the adapters of a LoRA step, unmerged: the base's
    shapes checked against those the adapters were trained on, the adapters restored into their shardings in the
    base's layer layout, the model's attention_type / shift_logits / block_size the run's (`adapted_config`;
    `overrides`, the loader's keyword arguments, win)."""
    trained_on = saved_config(run_dir, step)
    check_base(base_model.config, trained_on, layout.step_dir(run_dir, step), base_path)
    adapters = restore_adapters(run_dir, step, lora, trained_on, scan_layers=base_model.config.scan_layers,
                                mesh=mesh, rules=rules)
    return with_adapters(base_model, lora, adapters, adapted_config(base_model.config, trained_on, **overrides))


def read_lora_step(path: str):
    """(run_dir, step, LoRAConfig, base path, LLaDAConfig trained on, adapters pure dict of numpy) of a LoRA
    checkpoint (a run directory, its checkpoints/ directory or a step); UsageError for a whole model."""
    run_dir, step = layout.find_checkpoint(path)
    found = read_lora(run_dir, step)
    if found is None:
        raise UsageError(f"{path}: not a LoRA checkpoint (its step {step} holds a whole model, no "
                         f"'{layout.LORA}' item)")
    lora, base = found
    trained_on = saved_config(run_dir, step)
    adapters = restore_adapters(run_dir, step, lora, trained_on)
    return run_dir, step, lora, base, trained_on, jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)


def per_layer(adapters: dict, lora: LoRAConfig, config: LLaDAConfig
              ) -> dict[str, list[tuple[np.ndarray, np.ndarray] | None]]:
    """{target: [(A [in, r], B [r, out]) of each layer, or None where the layer has no such projection (a MoE
    layer's dense MLP)]} from a pure dict of adapters in either layout."""
    out: dict[str, list] = {t: [None] * config.n_layers for t in lora_lib.present_targets(config, lora)}
    scanned = {name: adapters[name]["adapters"] for name in layer_stacks(config)
               if "adapters" in adapters.get(name, {})}
    for i in range(config.n_layers):
        if scanned:  # stacked [layers, ...] per layer stack
            name, j = layer_stack(config, i)
            pairs = {t: (p["lora_a"][j], p["lora_b"][j]) for t, p in scanned[name].items()}
        else:
            blocks = adapters["blocks"]
            block = blocks[i] if i in blocks else blocks[str(i)]
            pairs = {t: (p["lora_a"], p["lora_b"]) for t, p in block["adapters"].items()}
        for t, (a, b) in pairs.items():
            out[t][i] = (np.asarray(a, np.float32), np.asarray(b, np.float32))
    return out


def save_adapters(run_dir: str, adapters: dict, config: LLaDAConfig, lora: LoRAConfig, base: str, *,
                  step: int = 0, tokenizer_dir: str | None = None) -> str:
    """Write adapters (a pure dict in `config`'s layout) as a one-step LoRA checkpoint of the base at `base`."""
    manager = checkpoint_manager(run_dir)
    items = model_items(config, ocp.args.StandardSave(adapters), lora=lora_item(lora, base))
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    manager.close()
    if tokenizer_dir and jax.process_index() == 0:
        copy_dir(tokenizer_dir, storage.join(run_dir, layout.TOKENIZER), last=layout.TOKENIZER_MARKERS)
    return run_dir
