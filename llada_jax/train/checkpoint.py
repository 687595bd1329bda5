"""Orbax checkpoints of models and training runs.

A run directory holds `checkpoints/<step>/` written by an Orbax `CheckpointManager`; each step is a composite
of items:

    params        the model parameters (a pytree in the model's own layout, scanned or unrolled)
    model_config  the LLaDAConfig as JSON (architecture and the layout the params were saved in)
    opt_state     optimizer state (training checkpoints only)
    train_state   step, seed and the non-finite counters as JSON (training checkpoints only); no RNG key is
                  stored: a step's randomness is derived from (seed, step), so resuming needs the same seed
    config        the full training config as JSON (training checkpoints only)
    data          every process's data-iterator state (training checkpoints only)

A tokenizer, when the run has one, is copied to `<run>/tokenizer/`. `load_model(path)` accepts a run
directory (its latest finished step), its `checkpoints/` directory, or one step directory, and builds the
model from the abstract shapes (the parameters are restored straight into place, never initialised first).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llada_jax import sharding
from llada_jax.config import LLaDAConfig
from llada_jax.model import LLaDAForMaskedLM

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"


class CheckpointNotFoundError(FileNotFoundError):
    pass


def checkpoint_manager(run_dir: str, *, keep: int | None = None, async_save: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, CHECKPOINTS)), options=options)


def find_checkpoint(path: str) -> tuple[str, int]:
    """(run directory, step) of the checkpoint `path` names: a run dir, its checkpoints/ dir, or a step dir."""
    path = os.path.abspath(path.rstrip("/"))
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    if re.fullmatch(r"\d+", os.path.basename(path)) and os.path.isdir(os.path.join(path, "params")):
        root = os.path.dirname(path)
        if os.path.basename(root) != CHECKPOINTS:
            raise CheckpointNotFoundError(f"{path}: a step directory must sit in a '{CHECKPOINTS}' directory")
        if not _is_finished(path):
            raise CheckpointNotFoundError(f"{path}: this checkpoint step was not finished (an interrupted save)")
        return os.path.dirname(root), int(os.path.basename(path))
    run_dir = os.path.dirname(path) if os.path.basename(path) == CHECKPOINTS else path
    ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointNotFoundError(f"{path}: not a checkpoint (no '{CHECKPOINTS}' directory)")
    step = latest_finished_step(run_dir)
    if step is None:
        raise CheckpointNotFoundError(f"{ckpt_dir}: holds no finished checkpoint step")
    return run_dir, step


def latest_finished_step(run_dir: str) -> int | None:
    """The largest step of `run_dir/checkpoints/` whose save completed (None when there is none)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    steps = [int(name) for name in os.listdir(root) if re.fullmatch(r"\d+", name) and
             _is_finished(os.path.join(root, name))] if os.path.isdir(root) else []
    return max(steps, default=None)


def restore_items(run_dir: str, step: int, **items):
    """Restore some items of one finished step, e.g. `restore_items(run, 7, model_config=ocp.args.JsonRestore())`.
    Reads the step directory directly (no CheckpointManager: nothing is created or cleaned up)."""
    path = os.path.join(os.path.abspath(run_dir), CHECKPOINTS, str(step))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(path, args=ocp.args.Composite(**items))


def _is_finished(step_dir: str) -> bool:
    # Orbax marks a finished step by renaming its temporary directory into place; a temporary name or a
    # missing metadata file means the save did not complete.
    return not re.search(r"\.orbax-checkpoint-tmp", step_dir) and os.path.exists(
        os.path.join(step_dir, "_CHECKPOINT_METADATA"))


def read_model_config(path: str) -> LLaDAConfig:
    return _saved_config(*find_checkpoint(path))


def _saved_config(run_dir: str, step: int) -> LLaDAConfig:
    restored = restore_items(run_dir, step, model_config=ocp.args.JsonRestore())
    return LLaDAConfig.from_dict(dict(restored.model_config), source=f"{run_dir} step {step}: model_config")


def abstract_model(config: LLaDAConfig):
    """(graphdef, abstract params state) of a model, built with eval_shape (no allocation)."""
    return nnx.split(nnx.eval_shape(lambda: LLaDAForMaskedLM(config, rngs=nnx.Rngs(0))))


def _restore_target(config: LLaDAConfig, mesh: jax.sharding.Mesh | None, rules) -> dict:
    """Pure-dict pytree of ShapeDtypeStructs with shardings: what Orbax restores the params into."""
    _, state = abstract_model(config)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    else:
        shardings = sharding.state_shardings(state, mesh, rules or sharding.current_rules())
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    return nnx.to_pure_dict(target)


def restore_params(path: str, config: LLaDAConfig, *, mesh=None, rules=None) -> dict:
    """Restore a checkpoint's parameters as a pure dict in `config`'s layout and param dtype."""
    run_dir, step = find_checkpoint(path)
    return _restore_params(run_dir, step, _saved_config(run_dir, step), config, mesh, rules)


def _restore_params(run_dir: str, step: int, saved: LLaDAConfig, config: LLaDAConfig, mesh, rules) -> dict:
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "padded_vocab_size",
                  "weight_tying"):
        if getattr(saved, field) != getattr(config, field):
            raise ValueError(f"{run_dir} step {step}: checkpoint has {field}={getattr(saved, field)}, "
                             f"but the model config asks for {getattr(config, field)}")
    layout = saved.replace(param_dtype=config.param_dtype)
    target = _restore_target(layout, mesh, rules)
    restored = restore_items(run_dir, step, params=ocp.args.StandardRestore(target))
    params = restored.params
    if saved.scan_layers != config.scan_layers:
        params = relayout_blocks(params, to_scanned=config.scan_layers, n_layers=config.n_layers)
    return params


def relayout_blocks(params: dict, *, to_scanned: bool, n_layers: int) -> dict:
    """Convert block parameters between the scanned (stacked) and unrolled (one entry per layer) layouts."""
    import jax.numpy as jnp

    params = dict(params)
    if to_scanned:
        per_layer = [params["blocks"][i] for i in range(n_layers)]
        params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    else:
        stacked = params["blocks"]
        params["blocks"] = {i: jax.tree.map(lambda x: x[i], stacked) for i in range(n_layers)}
    return params


def load_model(path: str, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None, rules=None,
               **overrides) -> LLaDAForMaskedLM:
    """A model restored from an Orbax checkpoint. `dtype` sets the compute dtype, `param_dtype` casts the
    stored parameters; other keyword arguments override LLaDAConfig fields that do not change shapes
    (scan_layers, remat_policy, attention_impl)."""
    run_dir, step = find_checkpoint(path)
    saved = _saved_config(run_dir, step)
    changes = dict(overrides)
    if dtype is not None:
        changes["dtype"] = dtype
    if param_dtype is not None:
        changes["param_dtype"] = param_dtype
    config = saved.replace(**changes)
    params = _restore_params(run_dir, step, saved, config, mesh, rules)
    graphdef, state = abstract_model(config)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def save_model(model: LLaDAForMaskedLM, run_dir: str, *, step: int = 0, tokenizer_dir: str | None = None) -> str:
    """Write `model` as a one-step checkpoint in `run_dir` (loadable by `load_model` and every command)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    manager = checkpoint_manager(run_dir)
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(model.config.to_dict())),
        force=True)
    manager.wait_until_finished()
    manager.close()
    if tokenizer_dir:
        copy_tokenizer(tokenizer_dir, run_dir)
    return run_dir


def copy_tokenizer(tokenizer_dir: str, run_dir: str) -> None:
    """Copy a tokenizer directory to `<run_dir>/tokenizer` (via a temporary name, then rename)."""
    if jax.process_index() != 0:
        return
    dest = os.path.join(run_dir, TOKENIZER)
    if os.path.abspath(tokenizer_dir) == os.path.abspath(dest):
        return
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tokenizer_dir, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def tokenizer_path(model_path: str) -> str | None:
    """The tokenizer stored with a checkpoint or HF directory, if there is one."""
    path = os.path.abspath(model_path.rstrip("/"))
    candidates = [path, os.path.join(path, TOKENIZER)]
    if re.fullmatch(r"\d+", os.path.basename(path)):  # a step directory: the run is two levels up
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(path)), TOKENIZER))
    if os.path.basename(path) == CHECKPOINTS:
        candidates.append(os.path.join(os.path.dirname(path), TOKENIZER))
    for c in candidates:
        if os.path.exists(os.path.join(c, "tokenizer.json")) or os.path.exists(os.path.join(c, "tokenizer_config.json")):
            return c
    return None


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
