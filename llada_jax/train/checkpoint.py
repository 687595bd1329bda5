"""Training checkpoints: saving and restoring a training state with its data position.

A training checkpoint step is a model checkpoint (the items of `checkpoints.orbax_model.model_items`, so
every command that loads a model loads a training run) plus the training items of
`checkpoints.layout`: the optimizer state, the train state (step, seed, non-finite counters; no RNG key, as
a step's randomness comes from (seed, step)), the training config, and the data iterator's state merged over
all processes (keyed by shard, so another process layout over the same shards restores it). A LoRA run's
steps are LoRA checkpoints (`checkpoints.adapters`): the adapters as `params`, and the `lora` item naming the base.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llada_jax.checkpoints import layout, storage
from llada_jax.checkpoints.adapters import read_lora
from llada_jax.checkpoints.orbax_model import model_items, restore_items
from llada_jax.errors import CheckpointError, ResumeError
from llada_jax.train.step import TrainState, host_scalar


def check_resumable(run_dir: str, seed: int, restore_step: int = 0, *, lora_item: dict | None = None) -> int | None:
    """The step a run in `run_dir` resumes from (None: nothing to resume): `restore_step`, or the latest finished
    step when it is 0, after checking that it is a training checkpoint saved with the same seed, and with the same
    LoRA settings on the same base (`lora_item`, the run's `adapters.lora_item`, or None without LoRA)."""
    steps = layout.finished_steps(run_dir)
    if restore_step:
        if restore_step not in steps:
            raise ResumeError(f"checkpoint.restore_step {restore_step}: {layout.checkpoints_dir(run_dir)} has no "
                              f"finished step {restore_step} (it has {', '.join(map(str, steps)) or 'none'})")
        step = restore_step
    elif not steps:
        return None
    else:
        step = steps[-1]
    where = layout.step_dir(run_dir, step)
    if not storage.is_dir(storage.join(where, layout.TRAIN_STATE)):
        raise ResumeError(f"{where} is a model checkpoint, not a training run's (no {layout.TRAIN_STATE}): start "
                          f"from it with --model_name_or_path and another --output_dir")
    saved = restore_items(run_dir, step, **{layout.TRAIN_STATE: ocp.args.JsonRestore()})[layout.TRAIN_STATE]
    if "seed" in saved and int(saved["seed"]) != int(seed):
        raise ResumeError(f"{where} was trained with seed {saved['seed']}, but this run has seed {seed}: the noise "
                          f"of every step comes from (seed, step), so resuming needs --seed {saved['seed']} (or "
                          f"start a new run in another --output_dir)")
    _check_same_lora(where, read_lora(run_dir, step), lora_item)
    return step


def _check_same_lora(where: str, saved, item: dict | None) -> None:
    if saved is None and item is None:
        return
    if saved is None or item is None:
        held, asked = ("whole-model", "LoRA") if saved is None else ("LoRA", "whole-model")
        raise ResumeError(f"{where} holds a {held} training state, but this run is a {asked} run (lora.enabled="
                          f"{item is not None}): resume with the settings it was started with, or use another "
                          f"--output_dir")
    saved_lora, saved_base = saved
    for field, value in saved_lora.to_dict().items():
        if item[field] != value:
            raise ResumeError(f"{where} holds adapters with lora.{field}={value!r}, but this run has "
                              f"lora.{field}={item[field]!r}: resume with the settings it was started with")
    if item["base"] != saved_base:
        raise ResumeError(f"{where} trained adapters on the base {saved_base}, but this run's model_name_or_path is "
                          f"{item['base']}: resume with the same base")


def gather_data_state(data) -> dict:
    """Every process's data-iterator state merged into one (per row stream: process-count free)."""
    from llada_jax.data.pipeline import merge_states

    local = data.get_state()
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.array([blob.size]))))
    padded = np.zeros(longest, np.uint8)
    padded[: blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return merge_states([json.loads(bytes(row).rstrip(b"\0").decode()) for row in rows])


def save(manager: ocp.CheckpointManager, state: TrainState, *, model_config, config, data,
         lora_item: dict | None = None) -> None:
    """Save a training step (asynchronously when the manager is): model items plus the training items (a LoRA run's
    `lora_item`, resolved once when the run starts, names the base it trains on)."""
    step = host_scalar(state.step)
    train_state = {"step": step, "nonfinite_streak": host_scalar(state.nonfinite_streak),
                   "nonfinite_total": host_scalar(state.nonfinite_total), "seed": int(config.seed)}
    items = model_items(model_config, ocp.args.StandardSave(state.params), lora=lora_item)
    items.update({
        layout.OPT_STATE: ocp.args.StandardSave(state.opt_state),
        layout.TRAIN_STATE: ocp.args.JsonSave(train_state),
        layout.TRAIN_CONFIG: ocp.args.JsonSave(config.to_dict()),
        layout.DATA_STATE: ocp.args.JsonSave(gather_data_state(data)),
    })
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def read_state(manager: ocp.CheckpointManager, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    """(the training state of `step` restored into the shardings of `abstract`, the saved data-iterator state).

    A step that cannot be read whole (truncated or missing files, bit rot, a partial copy) is a
    CheckpointError naming it, what is wrong, and the older steps that can be read."""
    where = f"{manager.directory / str(step)}"
    restored, reason = _restore_items(manager, step, abstract)
    if restored is None:
        raise CheckpointError(_damage_report(manager, step, abstract, reason))
    meta = restored[layout.TRAIN_STATE]
    if meta["step"] != step:
        raise ResumeError(f"{where} holds {layout.TRAIN_STATE}.step {meta['step']}")

    def scalar(v):
        return jax.device_put(jnp.asarray(v, jnp.int32), abstract.step.sharding)

    state = TrainState(step=scalar(meta["step"]), params=restored[layout.PARAMS],
                       opt_state=restored[layout.OPT_STATE], nonfinite_streak=scalar(meta["nonfinite_streak"]),
                       nonfinite_total=scalar(meta["nonfinite_total"]))
    return state, restored[layout.DATA_STATE]


def restore(manager: ocp.CheckpointManager, step: int, abstract: TrainState, data) -> TrainState:
    """`read_state`, and the data iterator moved to where it was."""
    state, data_state = read_state(manager, step, abstract)
    try:
        data.set_state(data_state)
    except ValueError as e:  # e.g. saved with another data.num_shards
        raise ResumeError(f"{manager.directory / str(step)}: {e}") from e
    return state


def _restore_items(manager: ocp.CheckpointManager, step: int, abstract: TrainState):
    """(the restored items of `step`, None), or (None, what is wrong) when they cannot be read."""
    held = []  # errors reported while the restore runs, passed on once it is known how it ended
    hook = sys.unraisablehook
    sys.unraisablehook = held.append
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            layout.PARAMS: ocp.args.StandardRestore(abstract.params),
            layout.OPT_STATE: ocp.args.StandardRestore(abstract.opt_state),
            layout.TRAIN_STATE: ocp.args.JsonRestore(),
            layout.DATA_STATE: ocp.args.JsonRestore(),
        }))
        reason = None
    except Exception as e:  # noqa: BLE001 - TensorStore, Orbax and the OS report damage in many types
        restored, reason = None, _first_line(e)
    finally:
        sys.unraisablehook = hook
    if reason is not None:
        _leave_out_abandoned_reads()
    for unraisable in held:
        sys.unraisablehook(unraisable)
    if reason is not None:
        gc.collect()  # the abandoned reads that can be collected now
    return restored, reason


def _leave_out_abandoned_reads() -> None:
    """A failed Orbax restore gives up on its other array reads while TensorStore still runs them, and each one
    reports itself later: as a suspended coroutine collected with the read error (one of them at interpreter
    shutdown with an ImportError besides), as a TensorStore callback that finds Orbax's event loop closed (both
    unraisable errors), and as an asyncio future whose exception was never retrieved (logged). The error was
    reported already: from now on, in this process, these reports are left out (the process ends with the
    error, or has checked older steps). Reports during a restore are held until it ends (`_restore_items`), so
    the ones of a failed restore that come before this is set up are left out too."""
    hook = sys.unraisablehook
    if getattr(hook, "leaves_out_abandoned_reads", False):
        return

    def leave_out_abandoned_reads(unraisable):
        if not _is_abandoned_read(unraisable):
            hook(unraisable)

    leave_out_abandoned_reads.leaves_out_abandoned_reads = True
    sys.unraisablehook = leave_out_abandoned_reads
    logging.getLogger("asyncio").addFilter(
        lambda record: "exception was never retrieved" not in record.getMessage())


def _is_abandoned_read(unraisable) -> bool:
    obj, error = unraisable.object, unraisable.exc_value
    if isinstance(obj, types.CoroutineType) and "orbax" in obj.cr_code.co_filename:
        return True
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            and any(f.name == "call_soon_threadsafe" for f in frames))


def _first_line(error: BaseException) -> str:
    """The innermost message of an error chain, on one line (TensorStore's own says which file and range)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return text if len(text) < 400 else text[:400] + " ..."


def _damage_report(manager: ocp.CheckpointManager, step: int, abstract: TrainState, reason: str) -> str:
    older = [s for s in layout.finished_steps(str(manager.directory.parent)) if s < step][::-1]
    readable = []
    for candidate in older[:MAX_CHECKED]:  # newest first; each check is a full restore
        if _restore_items(manager, candidate, abstract)[0] is not None:
            readable.append(candidate)
    where = f"{manager.directory / str(step)}"
    if readable:
        unchecked = older[MAX_CHECKED:]
        also = f" (older, not checked: {', '.join(map(str, unchecked))})" if unchecked else ""
        advice = (f"readable older steps: {', '.join(map(str, readable))}{also}. To resume from one, run the same "
                  f"command with --config.checkpoint.restore_step={readable[0]} (the later steps are deleted)")
    else:
        advice = (f"no older step is readable ({', '.join(map(str, older)) or 'there is none'}); start a new run in "
                  f"another --output_dir, or from a model with --model_name_or_path")
    return f"{where}: this checkpoint cannot be read ({reason}); {advice}"


MAX_CHECKED = 3  # older steps checked for a damage report
