"""Models in Orbax checkpoints: save, restore (sharded, straight into place), and one parameter at a time.

A model checkpoint step holds the items `params` and `model_config` (see `layout`); a training checkpoint
holds them too, plus the training items (`llada_jax.train.checkpoint`), so every training run is also a
model checkpoint. `model_items` is the one definition of how a model is written into a step.

    load_model(path, ...)         a run directory (latest finished step), its checkpoints/ dir or a step ->
                                  LLaDAForMaskedLM, parameters restored into their shardings, never
                                  initialised first (a whole model; a LoRA step is loaded, with its base, by
                                  `loading.load_pretrained`)
    save_model(model, run_dir)    a one-step model checkpoint
    save_params(run_dir, ...)     host numpy parameters written without extra copies (conversion)
    ParamReader(path)             the stored parameters read one at a time (conversion)
    read_model_config(path)       the LLaDAConfig of a checkpoint, without its parameters
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx, traverse_util

from llada_jax import sharding
from llada_jax.checkpoints import layout, storage
from llada_jax.checkpoints.atomic import copy_dir
from llada_jax.config import LLaDAConfig
from llada_jax.errors import CheckpointError, CheckpointNotFoundError
from llada_jax.model import LLaDAForMaskedLM, abstract_model, layer_stacks

# Fields that fix the parameters' shapes: a checkpoint restores only into a model that agrees on all of them.
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "padded_vocab_size",
                "weight_tying", "qk_norm", "num_experts", "expert_hidden_size", "num_shared_experts",
                "first_dense_layers", "router_expert_bias")


def model_items(config: LLaDAConfig, params_save, *, hf_config: dict | None = None, lora: dict | None = None) -> dict:
    """The composite-save arguments of a model, {item name: save args}: `params_save` (the parameters'
    `ocp.args.StandardSave` / `PyTreeSave`), the config, and optionally the config.json it was imported from, or
    the `lora` item of a LoRA checkpoint (`params_save` then saves the adapters; see `adapters`)."""
    items: dict[str, Any] = {layout.PARAMS: params_save, layout.MODEL_CONFIG: ocp.args.JsonSave(config.to_dict())}
    if hf_config is not None:
        items[layout.HF_CONFIG] = ocp.args.JsonSave(hf_config)
    if lora is not None:
        items[layout.LORA] = ocp.args.JsonSave(lora)
    return items


def checkpoint_manager(run_dir: str, *, keep: int | None = None, async_save: bool = False,
                       item_handlers: dict | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(layout.checkpoints_dir(run_dir), options=options, item_handlers=item_handlers)


def restore_items(run_dir: str, step: int, **items):
    """Restore some items of one finished step, e.g. `restore_items(run, 7, model_config=ocp.args.JsonRestore())`.
    Reads the step directory directly (no CheckpointManager: nothing is created or cleaned up)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(layout.step_dir(run_dir, step), args=ocp.args.Composite(**items))


def saved_config(run_dir: str, step: int) -> LLaDAConfig:
    restored = restore_items(run_dir, step, **{layout.MODEL_CONFIG: ocp.args.JsonRestore()})
    return LLaDAConfig.from_dict(dict(restored[layout.MODEL_CONFIG]),
                                 source=f"{run_dir} step {step}: {layout.MODEL_CONFIG}")


def read_model_config(path: str) -> LLaDAConfig:
    return saved_config(*layout.find_checkpoint(path))


def restore_target(config: LLaDAConfig, mesh: jax.sharding.Mesh | None = None, rules=None) -> dict:
    """Pure-dict pytree of ShapeDtypeStructs with shardings: where a model's parameters are restored to (one
    local device without a mesh; by the logical-axis `rules` on a mesh)."""
    _, state = abstract_model(config)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    else:
        shardings = sharding.state_shardings(state, mesh, rules or sharding.current_rules())
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    return nnx.to_pure_dict(target)


def relayout_blocks(params: dict, *, to_scanned: bool, config: LLaDAConfig) -> dict:
    """Convert block parameters between the scanned layout (each layer stack stacked: `layer_stacks`) and the
    unrolled one (`blocks`, one entry per layer)."""
    import jax.numpy as jnp

    params = dict(params)
    stacks = layer_stacks(config)
    if to_scanned:
        unrolled = params.pop("blocks")
        for name, (first, count) in stacks.items():
            per_layer = [unrolled[i] if i in unrolled else unrolled[str(i)] for i in range(first, first + count)]
            params[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    else:
        unrolled = {}
        for name, (first, count) in stacks.items():
            stacked = params.pop(name)
            unrolled.update({first + j: jax.tree.map(lambda x, j=j: x[j], stacked) for j in range(count)})
        params["blocks"] = unrolled
    return params


def restore_params(run_dir: str, step: int, config: LLaDAConfig, *, mesh=None, rules=None) -> dict:
    """A step's parameters as a pure dict in `config`'s layout (scanned or not) and param dtype."""
    saved = saved_config(run_dir, step)
    for field in SHAPE_FIELDS:
        if getattr(saved, field) != getattr(config, field):
            raise CheckpointError(f"{run_dir} step {step}: checkpoint has {field}={getattr(saved, field)}, "
                                  f"but the model config asks for {getattr(config, field)}")
    target = restore_target(saved.replace(param_dtype=config.param_dtype), mesh, rules)
    params = restore_items(run_dir, step, **{layout.PARAMS: ocp.args.StandardRestore(target)})[layout.PARAMS]
    if saved.scan_layers != config.scan_layers:
        params = relayout_blocks(params, to_scanned=config.scan_layers, config=config)
    return params


def merge_params(config: LLaDAConfig, params: dict) -> LLaDAForMaskedLM:
    """A model of `config` around a pure dict of (placed) parameters."""
    graphdef, state = abstract_model(config)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_model(path: str, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None, rules=None,
               **overrides) -> LLaDAForMaskedLM:
    """A whole model restored from an Orbax checkpoint. `dtype` sets the compute dtype, `param_dtype` casts the
    stored parameters; other keyword arguments override LLaDAConfig fields that do not change shapes
    (scan_layers, remat_policy, attention_impl). A LoRA checkpoint holds no whole model: `load_pretrained` loads
    its base and applies the adapters (`loading.load_lora_model`)."""
    run_dir, step = layout.find_checkpoint(path)
    if layout.is_lora_step(run_dir, step):
        raise CheckpointError(f"{layout.step_dir(run_dir, step)}: a LoRA checkpoint (adapters only, no whole model): "
                              f"load it with load_pretrained or load_model_and_tokenizer, which load its base and "
                              f"apply the adapters")
    changes = dict(overrides)
    if dtype is not None:
        changes["dtype"] = dtype
    if param_dtype is not None:
        changes["param_dtype"] = param_dtype
    config = saved_config(run_dir, step).replace(**changes)
    return merge_params(config, restore_params(run_dir, step, config, mesh=mesh, rules=rules))


def save_model(model: LLaDAForMaskedLM, run_dir: str, *, step: int = 0, tokenizer_dir: str | None = None) -> str:
    """Write `model` as a one-step checkpoint in `run_dir` (loadable by `load_model` and every command)."""
    if model.lora is not None:
        raise ValueError("save_model writes whole models: merge the adapters first (model.merge_lora()), or save "
                         "them with llada_jax.checkpoints.adapters.save_adapters")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    manager = checkpoint_manager(run_dir)
    manager.save(step, args=ocp.args.Composite(**model_items(model.config, ocp.args.StandardSave(params))), force=True)
    manager.wait_until_finished()
    manager.close()
    if tokenizer_dir and jax.process_index() == 0:
        copy_dir(tokenizer_dir, storage.join(run_dir, layout.TOKENIZER), last=layout.TOKENIZER_MARKERS)
    return run_dir


def save_params(run_dir: str, params: dict, config: LLaDAConfig, *, step: int = 0,
                hf_config: dict | None = None) -> None:
    """Write a pure-dict pytree of host numpy parameters (in `config`'s layout) as a model checkpoint.

    Two Orbax defaults would double peak memory, so the `params` item is written by a PyTree handler that
    (1) writes the numpy arrays in place (the default numpy handler deep-copies every array before its
    asynchronous write, a guard against the caller mutating it; this save is synchronous), and (2) stores
    the arrays uncompressed (with compression, the OCDBT writer holds the compressed chunks of every array
    until the save completes). `load_model` restores the item like any other checkpoint.
    """
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    params_handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    handlers = {layout.PARAMS: params_handler, layout.MODEL_CONFIG: ocp.JsonCheckpointHandler()}
    if hf_config is not None:
        handlers[layout.HF_CONFIG] = ocp.JsonCheckpointHandler()
    manager = checkpoint_manager(run_dir, item_handlers=handlers)
    items = model_items(config, ocp.args.PyTreeSave(params), hf_config=hf_config)
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    manager.close()


class ParamReader:
    """The parameters of an Orbax model checkpoint (run dir, checkpoints/ dir or step dir), one at a time."""

    def __init__(self, path: str):
        self.run_dir, self.step = layout.find_checkpoint(path)
        self.config = saved_config(self.run_dir, self.step)
        self.step_dir = layout.step_dir(self.run_dir, self.step)
        self.params_dir = epath.Path(self.step_dir) / layout.PARAMS
        if not self.params_dir.is_dir():
            raise CheckpointNotFoundError(f"{self.step_dir}: has no '{layout.PARAMS}' item")
        self._handler = ocp.PyTreeCheckpointHandler()
        self.metadata = self._handler.metadata(self.params_dir).tree

    def paths(self) -> list[tuple]:
        """The key path of every stored parameter."""
        return list(traverse_util.flatten_dict(self.metadata))

    def read(self, path: tuple) -> np.ndarray:
        """One stored parameter as a host numpy array (only this one is read)."""
        item: Any = np.zeros(())
        restore_args: Any = ocp.RestoreArgs(restore_type=np.ndarray)
        for key in reversed(path):
            item, restore_args = {key: item}, {key: restore_args}
        restored = self._handler.restore(
            self.params_dir,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        for key in path:
            restored = restored[key]
        return np.asarray(restored)

    def hf_config(self) -> dict | None:
        """The config.json this checkpoint was imported from, when it was converted from Hugging Face."""
        if not (epath.Path(self.step_dir) / layout.HF_CONFIG).is_dir():
            return None
        restored = restore_items(self.run_dir, self.step, **{layout.HF_CONFIG: ocp.args.JsonRestore()})
        return dict(restored[layout.HF_CONFIG])
