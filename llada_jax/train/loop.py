"""The training loop behind `llada-jax pretrain` and `llada-jax sft`.

Start-up checks everything that can be wrong before any work (config values, the model config, the
learning-rate schedule, data path and shards, mesh, batch divisibility, the seed of a run being resumed).
The run then resumes from the latest checkpoint in `output_dir` when there is one (parameters, optimizer
state, step and every process's data-iterator position; the step's randomness comes from (seed, step), so
the seed must be the checkpoint's), else starts from
`model_name_or_path` (parameters only) or from a fresh initialisation. Each step consumes
`gradient_accumulation_steps` global micro-batches. Checkpoints are written every `save_steps` and at the
end (asynchronously; a SIGTERM finishes the current step, saves and exits).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from llada_jax import sharding
from llada_jax.config import LLaDAConfig, model_config_from
from llada_jax.train import checkpoint as ckpt
from llada_jax.train.metrics import MetricsLogger
from llada_jax.train.step import Trainer, flops_per_token, params_all_finite, peak_flops_per_device

log = logging.getLogger("llada_jax")

# Fault injection for the resume tests: the process kills itself (SIGKILL) right after this step (only the
# process of index LLADA_JAX_FAULT_PROCESS when that is set).
FAULT_ENV = "LLADA_JAX_FAULT_AFTER_STEP"
FAULT_PROCESS_ENV = "LLADA_JAX_FAULT_PROCESS"
# Architecture fields taken from a checkpoint given as model_name_or_path (compute settings stay as configured).
ARCHITECTURE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                       "embedding_size", "max_sequence_length", "rope_theta", "rms_norm_eps", "weight_tying",
                       "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")


class ConfigError(ValueError):
    """A problem with the run's configuration, found before any work."""


class ResumeError(ConfigError):
    """The checkpoint in output_dir cannot be continued with this configuration."""


class TrainingStopped(RuntimeError):
    """Training stopped itself (e.g. too many non-finite steps in a row)."""


def validate(config) -> None:
    def fail(msg):
        raise ConfigError(msg)

    if config.task not in ("pretrain", "sft"):
        fail(f"task: expected 'pretrain' or 'sft', got {config.task!r}")
    if not config.output_dir:
        fail("output_dir is required (--output_dir DIR)")
    if not config.data_path:
        fail("data_path is required (--data_path FILE|GLOB|DIR|tfds:NAME:SPLIT)")
    if not config.data_path.startswith("tfds:") and not glob.glob(config.data_path):
        fail(f"data_path {config.data_path!r}: no such file, directory or glob match")
    for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "max_length", "save_steps",
                 "logging_steps"):
        if int(config[name]) <= 0:
            fail(f"{name} must be a positive integer, got {config[name]}")
    if int(config.warmup_steps) < 0:
        fail(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    if not 0 < config.eps < 1 or not 0 <= config.random_length_prob <= 1:
        fail("eps must be in (0, 1) and random_length_prob in [0, 1]")
    if config.max_length > config.model.max_sequence_length:
        fail(f"max_length {config.max_length} exceeds the model's max_sequence_length "
             f"{config.model.max_sequence_length}")
    for name, value in (("checkpoint.keep", config.checkpoint.keep),
                        ("max_consecutive_nonfinite", config.max_consecutive_nonfinite)):
        if not isinstance(value, int) or value <= 0:
            fail(f"{name} must be a positive integer, got {value!r}")
    _check_optimizer(config, fail)
    _check_model(config)
    _check_data(config, fail)
    try:
        sharding.check_rules(config.mesh.logical_axis_rules)
    except sharding.MeshError as e:
        fail(str(e))


def _check_optimizer(config, fail) -> None:
    from llada_jax.train.optimizer import learning_rate_schedule

    o = config.optimizer
    if not config.learning_rate >= 0 or not np.isfinite(config.learning_rate):
        fail(f"learning_rate must be a finite number >= 0, got {config.learning_rate}")
    if not 0 <= o.min_lr_ratio <= 1 or not 0 <= o.decay_fraction <= 1:
        fail(f"optimizer.min_lr_ratio and optimizer.decay_fraction must be in [0, 1], got {o.min_lr_ratio} "
             f"and {o.decay_fraction}")
    if not 0 <= o.b1 < 1 or not 0 <= o.b2 < 1 or o.eps <= 0 or o.weight_decay < 0:
        fail(f"optimizer: need 0 <= b1, b2 < 1, eps > 0 and weight_decay >= 0, got b1={o.b1} b2={o.b2} "
             f"eps={o.eps} weight_decay={o.weight_decay}")
    try:
        learning_rate_schedule(config)  # the schedule the step will use: a bad lr_scheduler_type fails here
    except ValueError as e:
        fail(str(e))


def _check_model(config) -> LLaDAConfig:
    try:
        return model_config_from(config)
    except (ValueError, TypeError) as e:  # LLaDAConfig's own checks, e.g. "LLaDAConfig.remat_policy: ..."
        raise ConfigError(str(e).replace("LLaDAConfig.", "model.", 1)) from e


def _check_data(config, fail) -> None:
    from llada_jax.data.formats import PRETRAIN_MODES, TOO_LONG_POLICIES
    from llada_jax.data.pipeline import num_shards

    if config.data.pretrain_mode not in PRETRAIN_MODES:
        fail(f"data.pretrain_mode: expected one of {PRETRAIN_MODES}, got {config.data.pretrain_mode!r}")
    if config.data.too_long not in TOO_LONG_POLICIES:
        fail(f"data.too_long: expected one of {TOO_LONG_POLICIES}, got {config.data.too_long!r}")
    try:
        num_shards(config, jax.process_count())
    except ValueError as e:
        fail(str(e))


def resolve_model_config(config) -> LLaDAConfig:
    """The model config of the run: config.model, with the architecture of `model_name_or_path` if given."""
    model_config = _check_model(config)
    if config.model_name_or_path:
        from llada_jax.convert import read_model_config

        try:
            pretrained = read_model_config(config.model_name_or_path)
            model_config = model_config.replace(**{f: getattr(pretrained, f) for f in ARCHITECTURE_FIELDS})
        except ValueError as e:
            raise ConfigError(f"model_name_or_path {config.model_name_or_path}: {e}") from e
    return model_config


def check_resume(config) -> int | None:
    """The step of the checkpoint in `output_dir` the run will resume from (None: no checkpoint), after
    checking that it can be resumed with this config: a training checkpoint saved with the same seed."""
    if not os.path.isdir(config.output_dir):
        return None
    step = ckpt.latest_finished_step(config.output_dir)
    if step is None:
        return None
    where = os.path.join(config.output_dir, ckpt.CHECKPOINTS, str(step))
    if not os.path.isdir(os.path.join(where, "train_state")):
        raise ResumeError(f"{where} is a model checkpoint, not a training run's (no train_state): start from it "
                          f"with --model_name_or_path and another --output_dir")
    saved = ckpt.restore_items(config.output_dir, step, train_state=ocp.args.JsonRestore()).train_state
    if "seed" in saved and int(saved["seed"]) != int(config.seed):
        raise ResumeError(f"{where} was trained with seed {saved['seed']}, but this run has seed {config.seed}: "
                          f"the noise of every step comes from (seed, step), so resuming needs --seed "
                          f"{saved['seed']} (or start a new run in another --output_dir)")
    return step


def make_run_mesh(config, devices=None):
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except sharding.MeshError as e:
        raise ConfigError(str(e)) from e
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    dp = sharding.data_parallel_size(rules, mesh)
    if config.batch_size % dp:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {dp} data-parallel shards of "
                          f"mesh {dict(mesh.shape)}")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
    return mesh


class _Preemption:
    """SIGTERM sets a flag; the loop saves after the current step and exits."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            pass

    def _handler(self, signum, frame):
        self.requested = True


def train(config) -> dict:
    """Run (or resume) training as configured; returns the last logged metrics."""
    validate(config)
    from llada_jax.data.pipeline import global_batch, make_train_iterator

    if not config.data.tokenizer:  # the tokenizer stored with the run or with the starting checkpoint
        stored = ckpt.tokenizer_path(config.output_dir) if os.path.isdir(config.output_dir) else None
        if stored is None and config.model_name_or_path:
            stored = ckpt.tokenizer_path(config.model_name_or_path)
        config.data.tokenizer = stored or ""

    check_resume(config)
    model_config = resolve_model_config(config)
    config.model.update(model_config.to_dict())
    mesh = make_run_mesh(config)
    is_main = jax.process_index() == 0
    os.makedirs(config.output_dir, exist_ok=True)

    trainer = Trainer(config, model_config, mesh)
    data = make_train_iterator(config, model_config, process_index=jax.process_index(),
                               process_count=jax.process_count())
    manager = ckpt.checkpoint_manager(config.output_dir, keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    start = manager.latest_step()
    if start is not None:
        state = _restore(manager, start, trainer, data)
        log.info("resumed from %s step %d", config.output_dir, start)
    elif config.model_name_or_path:
        from llada_jax.convert import load_pretrained

        start = 0
        model = load_pretrained(config.model_name_or_path, mesh=mesh, rules=trainer.rules,
                                param_dtype=model_config.param_dtype, scan_layers=model_config.scan_layers)
        from flax import nnx

        state = trainer.state_from_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        log.info("initialised parameters from %s", config.model_name_or_path)
    else:
        start = 0
        state = trainer.init_state(int(config.seed))
    if is_main:
        ckpt.write_json_atomic(os.path.join(config.output_dir, "config.json"), config.to_dict())
        if config.data.tokenizer:
            ckpt.copy_tokenizer(config.data.tokenizer, config.output_dir)

    logger = MetricsLogger(config.output_dir, enabled=is_main, wandb_config=config.wandb,
                           run_config=config.to_dict())
    logger.truncate_after(start)
    max_steps = int(config.max_steps)
    if start >= max_steps:
        log.info("%s is already at step %d >= max_steps %d: nothing to do", config.output_dir, start, max_steps)
        manager.close()
        logger.close()
        return {}

    tokens_per_step = config.gradient_accumulation_steps * config.batch_size * config.max_length
    flops_per_step = flops_per_token(model_config, config.max_length) * tokens_per_step
    peak = peak_flops_per_device()
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    if os.environ.get(FAULT_PROCESS_ENV, "") not in ("", str(jax.process_index())):
        fault_step = 0
    preemption = _Preemption()
    progress = _progress_bar(is_main, start, max_steps)
    last = {}
    pending = None  # (step, metrics) of the step before the one in flight: read once the next is dispatched
    window_start, window_steps = time.perf_counter(), 0

    def finish(step_done, metrics, step_seconds):
        nonlocal last
        m = {k: host_scalar(v) for k, v in metrics.items()}
        if m["update_skipped"]:
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step_done,
                        m["nonfinite_streak"])
        if step_done % config.logging_steps == 0 or step_done == max_steps:
            row = {"loss": m["loss"], "learning_rate": m["learning_rate"], "grad_norm": m["grad_norm"],
                   "tokens_per_sec": tokens_per_step / step_seconds, "step_time": step_seconds,
                   "tflops_per_sec": flops_per_step / step_seconds / 1e12,
                   "masked_tokens": m["masked_tokens"], "skipped_updates": m["nonfinite_total"],
                   "batch_checksum": m["batch_checksum"]}
            if peak:
                row["mfu"] = flops_per_step / step_seconds / (peak * jax.device_count())
            logger.log(step_done, row)
            last = {"step": step_done, **row}
            progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['learning_rate']:.2e}", refresh=False)
        if m["nonfinite_streak"] >= config.max_consecutive_nonfinite:
            raise TrainingStopped(
                f"stopping at step {step_done}: {m['nonfinite_streak']} consecutive steps had a non-finite loss or "
                f"gradient (max_consecutive_nonfinite={config.max_consecutive_nonfinite}); the last checkpoint "
                f"holds the last finite parameters")

    try:
        for step in range(start + 1, max_steps + 1):
            micro = [next(data) for _ in range(config.gradient_accumulation_steps)]
            local = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
            batch = global_batch(local, mesh, trainer.batch_sharding.spec)
            state, metrics = trainer.step(state, batch)
            window_steps += 1
            if pending is not None:
                finish(*pending)
            now = time.perf_counter()
            if step % config.logging_steps == 0 or step == max_steps:
                jax.block_until_ready(metrics)  # time whole steps: the window ends when this one is done
                now = time.perf_counter()
            pending = (step, metrics, (now - window_start) / window_steps)
            if step % config.logging_steps == 0 or step == max_steps:
                finish(*pending)
                pending = None
                window_start, window_steps = time.perf_counter(), 0
            progress.update(1)
            if step % config.save_steps == 0 or step == max_steps or preemption.requested:
                _save(manager, step, state, trainer, data, config)
            if step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if preemption.requested:
                log.warning("SIGTERM: saved step %d and stopping", step)
                break
        if pending is not None:
            finish(*pending)
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        logger.close()
    return last


def host_scalar(x):
    """A replicated scalar as a Python number (from this process's copy: works across processes)."""
    return np.asarray(x.addressable_shards[0].data if isinstance(x, jax.Array) else x).item()


def _state_json(state) -> dict:
    return {"step": host_scalar(state.step), "nonfinite_streak": host_scalar(state.nonfinite_streak),
            "nonfinite_total": host_scalar(state.nonfinite_total)}


def _data_state(data) -> dict:
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


def _save(manager, step, state, trainer, data, config) -> None:
    if not params_all_finite(state.params):
        log.error("step %d: parameters are not finite; checkpoint NOT written", step)
        return
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        train_state=ocp.args.JsonSave({**_state_json(state), "seed": int(config.seed)}),
        model_config=ocp.args.JsonSave(trainer.model_config.to_dict()),
        config=ocp.args.JsonSave(config.to_dict()),
        data=ocp.args.JsonSave(_data_state(data)),
    ), force=True)


def _restore(manager, step, trainer, data):
    import jax.numpy as jnp

    from llada_jax.train.step import TrainState

    abstract = trainer.abstract_state()
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        train_state=ocp.args.JsonRestore(),
        data=ocp.args.JsonRestore(),
    ))
    try:
        data.set_state(restored.data)
    except ValueError as e:  # e.g. saved with another data.num_shards
        raise ResumeError(f"{manager.directory / str(step)}: {e}") from e
    meta = restored.train_state
    if meta["step"] != step:
        raise ResumeError(f"{manager.directory / str(step)} holds train_state.step {meta['step']}")

    def scalar(v):
        return jax.device_put(jnp.asarray(v, jnp.int32), trainer.state_shardings.step)

    return TrainState(step=scalar(meta["step"]), params=restored.params, opt_state=restored.opt_state,
                      nonfinite_streak=scalar(meta["nonfinite_streak"]),
                      nonfinite_total=scalar(meta["nonfinite_total"]))


def _progress_bar(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm

    import sys

    # On a terminal the bar redraws in place; in a log file (no TTY) an update every 30 s is plenty.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=interval)
