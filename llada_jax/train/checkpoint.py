"""Training checkpoints: saving and restoring a training state with its data position.

A training checkpoint step is a model checkpoint (the items of `checkpoints.orbax_model.model_items`, so
every command that loads a model loads a training run) plus the training items of
`checkpoints.layout`: the optimizer state, the train state (step, seed, non-finite counters; no RNG key, as
a step's randomness comes from (seed, step)), the training config, and the data iterator's state merged over
all processes (keyed by shard, so another process layout over the same shards restores it).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llada_jax.checkpoints import layout
from llada_jax.checkpoints.orbax_model import model_items, restore_items
from llada_jax.errors import ResumeError
from llada_jax.train.step import TrainState, host_scalar


def check_resumable(run_dir: str, seed: int) -> int | None:
    """The step a run in `run_dir` resumes from (None: nothing to resume), after checking that it is a
    training checkpoint saved with the same seed."""
    step = layout.latest_finished_step(run_dir)
    if step is None:
        return None
    where = layout.step_dir(run_dir, step)
    if not os.path.isdir(os.path.join(where, layout.TRAIN_STATE)):
        raise ResumeError(f"{where} is a model checkpoint, not a training run's (no {layout.TRAIN_STATE}): start "
                          f"from it with --model_name_or_path and another --output_dir")
    saved = restore_items(run_dir, step, **{layout.TRAIN_STATE: ocp.args.JsonRestore()})[layout.TRAIN_STATE]
    if "seed" in saved and int(saved["seed"]) != int(seed):
        raise ResumeError(f"{where} was trained with seed {saved['seed']}, but this run has seed {seed}: the noise "
                          f"of every step comes from (seed, step), so resuming needs --seed {saved['seed']} (or "
                          f"start a new run in another --output_dir)")
    return step


def gather_data_state(data) -> dict:
    """Every process's data-iterator state merged into one dict of per-shard states (process-count free)."""
    local = data.get_state()
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.array([blob.size]))))
    padded = np.zeros(longest, np.uint8)
    padded[: blob.size] = blob
    merged = {"shards": {}}
    for row in np.asarray(multihost_utils.process_allgather(padded)):
        merged["shards"].update(json.loads(bytes(row).rstrip(b"\0").decode())["shards"])
    return merged


def save(manager: ocp.CheckpointManager, state: TrainState, *, model_config, config, data) -> None:
    """Save a training step (asynchronously when the manager is): model items plus the training items."""
    step = host_scalar(state.step)
    train_state = {"step": step, "nonfinite_streak": host_scalar(state.nonfinite_streak),
                   "nonfinite_total": host_scalar(state.nonfinite_total), "seed": int(config.seed)}
    items = model_items(model_config, ocp.args.StandardSave(state.params))
    items.update({
        layout.OPT_STATE: ocp.args.StandardSave(state.opt_state),
        layout.TRAIN_STATE: ocp.args.JsonSave(train_state),
        layout.TRAIN_CONFIG: ocp.args.JsonSave(config.to_dict()),
        layout.DATA_STATE: ocp.args.JsonSave(gather_data_state(data)),
    })
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract: TrainState, data) -> TrainState:
    """The training state of `step`, restored into the shardings of `abstract` (ShapeDtypeStructs), and the
    data iterator moved to where it was."""
    where = f"{manager.directory / str(step)}"
    restored = manager.restore(step, args=ocp.args.Composite(**{
        layout.PARAMS: ocp.args.StandardRestore(abstract.params),
        layout.OPT_STATE: ocp.args.StandardRestore(abstract.opt_state),
        layout.TRAIN_STATE: ocp.args.JsonRestore(),
        layout.DATA_STATE: ocp.args.JsonRestore(),
    }))
    try:
        data.set_state(restored[layout.DATA_STATE])
    except ValueError as e:  # e.g. saved with another data.num_shards
        raise ResumeError(f"{where}: {e}") from e
    meta = restored[layout.TRAIN_STATE]
    if meta["step"] != step:
        raise ResumeError(f"{where} holds {layout.TRAIN_STATE}.step {meta['step']}")

    def scalar(v):
        return jax.device_put(jnp.asarray(v, jnp.int32), abstract.step.sharding)

    return TrainState(step=scalar(meta["step"]), params=restored[layout.PARAMS],
                      opt_state=restored[layout.OPT_STATE], nonfinite_streak=scalar(meta["nonfinite_streak"]),
                      nonfinite_total=scalar(meta["nonfinite_total"]))
