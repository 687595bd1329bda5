"""The training loop behind `llada-jax pretrain` and `llada-jax sft`.

    validate(config)        every check that needs no device: config values, model (and the one it starts from),
                            schedule, data, rules, and settings the run would not use
    TrainingRun.open(...)   the run set up: mesh, train step, data, checkpoint manager, and the state
                            (resumed from output_dir, or started from model_name_or_path, or initialised)
    train(config)           the loop: step, log, evaluate if due, save if due, stop if asked

A run resumes from the latest checkpoint in `output_dir` when there is one (parameters, optimizer state, step
and every process's data-iterator position; the step's randomness comes from (seed, step), so the seed must
be the checkpoint's). Each step consumes `gradient_accumulation_steps` global micro-batches. Checkpoints are
written every `save_steps` and at the end (asynchronously); a SIGTERM finishes the current step, saves and
exits. `train(config, on_step=f)` calls f(step) after every step (tests inject faults there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import time
from typing import Callable

import jax
import numpy as np

from llada_jax import sharding
from llada_jax.checkpoints import adapters, layout, storage
from llada_jax.checkpoints.atomic import copy_dir, write_json
from llada_jax.checkpoints.orbax_model import checkpoint_manager
from llada_jax.config import ADAPTABLE_FIELDS, LLaDAConfig, lora_config_from, model_config_from, unused_settings
from llada_jax.errors import ConfigError, MeshError, TrainingStopped
from llada_jax.train import checkpoint
from llada_jax.train.metrics import MetricsLogger
from llada_jax.train.step import (
    Trainer,
    flops_per_token,
    host_scalar,
    params_all_finite,
    peak_flops_per_device,
)

log = logging.getLogger("llada_jax")

# Architecture fields taken from a checkpoint given as model_name_or_path (compute settings stay as configured).
ARCHITECTURE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                       "embedding_size", "max_sequence_length", "rope_theta", "rms_norm_eps", "weight_tying",
                       "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "include_qkv_bias")
# The run's ADAPTABLE_FIELDS (attention_type, shift_logits, block_size): config.model's value where it differs from
# the LLaDA default, else the checkpoint's.


# ----------------------------------------------------------------------------------------------------
# Start-up checks
# ----------------------------------------------------------------------------------------------------


def validate(config, overridden=()) -> LLaDAConfig:
    """Raise ConfigError naming the first bad setting (nothing touches a device or writes a file); returns the model
    config of the run (`resolve_model_config`). `overridden`: the keys the command line set (`override_keys`),
    which count as given even at their default value: an option given while it does not apply (a LoRA setting
    with lora.enabled false, ...) is an error, never silently ignored (`config.unused_settings`)."""
    from llada_jax.data.settings import check_config
    from llada_jax.data.sources import resolve_paths
    from llada_jax.train.optimizer import learning_rate_schedule

    def fail(msg):
        raise ConfigError(msg)

    if not config.output_dir:
        fail("output_dir is required (--output_dir DIR)")
    for name in ("data_path", "eval_data_path"):
        path = config[name]
        if name == "data_path" and not path:
            fail("data_path is required (--data_path FILE|GLOB|DIR|tfds:NAME:SPLIT)")
        if path and not path.startswith("tfds:"):
            try:
                resolve_paths(path)
            except (OSError, ValueError) as e:  # a missing file, object or bucket: named in the message
                fail(f"{name}: {e}")
    for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "max_length", "save_steps",
                 "logging_steps"):
        if int(config[name]) <= 0:
            fail(f"{name} must be a positive integer, got {config[name]}")
    for name in ("warmup_steps", "eval_steps", "eval_batches"):
        if int(config[name]) < 0:
            fail(f"{name} must be >= 0, got {config[name]}")
    if config.eval_data_path and (config.eval_steps == 0 or config.eval_batches == 0):
        fail("eval_data_path is set: eval_steps and eval_batches must be positive")
    if not 0 < config.eps < 1 or not 0 <= config.random_length_prob <= 1:
        fail("eps must be in (0, 1) and random_length_prob in [0, 1]")
    for name, value in (("checkpoint.keep", config.checkpoint.keep),
                        ("max_consecutive_nonfinite", config.max_consecutive_nonfinite)):
        if not isinstance(value, int) or value <= 0:
            fail(f"{name} must be a positive integer, got {value!r}")
    annealing = config.adaptation.mask_annealing_steps
    if not isinstance(annealing, int) or isinstance(annealing, bool) or annealing < 0:
        fail(f"adaptation.mask_annealing_steps must be an integer >= 0 (0: no annealing), got {annealing!r}")
    model_config = resolve_model_config(config)
    check_lora(config)
    check_objective(config)
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
        # task, the data.* choices, max_length against config.model and the shard layout
        check_config(config, process_count=jax.process_count())
    except ValueError as e:
        fail(str(e))
    sharding.check_rules(config.mesh.logical_axis_rules)
    unused = unused_settings(config, model_config, overridden)
    if unused:
        fail(unused)
    named = [f"model.{f}" for f in ARCHITECTURE_FIELDS if f"model.{f}" in overridden]
    if named and config.model_name_or_path:  # (the checkpoint's architecture replaces config.model's)
        fail(f"{', '.join(named)} {'is' if len(named) == 1 else 'are'} set, but the architecture is the one of "
             f"model_name_or_path ({layout.model_config_file(config.model_name_or_path)}): leave the setting out")
    return model_config


def check_block_diffusion(config, model_config: LLaDAConfig) -> None:
    """The block-diffusion settings against the model (ConfigError naming the setting)."""
    bd = config.block_diffusion
    if not 0 < bd.mask_rate_min <= bd.mask_rate_max <= 1:
        raise ConfigError(f"block_diffusion: need 0 < mask_rate_min <= mask_rate_max <= 1, got "
                          f"{bd.mask_rate_min} and {bd.mask_rate_max}")
    schedule = [tuple(entry) for entry in bd.block_size_schedule]
    if any(len(e) != 2 or not all(isinstance(v, int) for v in e) or e[0] < 0 or e[1] <= 0 for e in schedule) or \
            [e[0] for e in schedule] != sorted(e[0] for e in schedule):
        raise ConfigError(f"block_diffusion.block_size_schedule must be ((step, block_size), ...) with steps >= 0 in "
                          f"increasing order and positive sizes, got {bd.block_size_schedule!r}")
    late = [s for s, _ in schedule if s >= config.max_steps]
    if late:
        raise ConfigError(f"block_diffusion.block_size_schedule: step {late[0]} is never reached (max_steps is "
                          f"{config.max_steps})")
    if config.adaptation.mask_annealing_steps and model_config.attention_type != "bidirectional":
        raise ConfigError(f"adaptation.mask_annealing_steps applies to bidirectional models, not "
                          f"{model_config.attention_type} ones (it anneals causal attention into bidirectional)")
    if model_config.attention_type != "block_causal":
        return  # (its block_diffusion options are named by config.unused_settings)
    for where, size in [("model.block_size", model_config.block_size)] + [
            (f"block_diffusion.block_size_schedule step {s}", b) for s, b in schedule]:
        if config.max_length % size:
            raise ConfigError(f"{where}: block size {size} does not divide max_length {config.max_length}")


def check_objective(config) -> None:
    """The loss terms and the experts' balancing settings (ConfigError naming the setting)."""
    for name in ("loss.confidence_beta", "moe.load_balance_loss", "moe.router_z_loss"):
        value = config[name.split(".")[0]][name.split(".")[1]]
        if not np.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
    rate = config.moe.bias_update_rate
    if not np.isfinite(rate) or (rate < 0 and rate != -1):
        raise ConfigError(f"moe.bias_update_rate must be a finite number >= 0 (0: off) or -1 (the default: 0.001 "
                          f"when the model's router has an expert bias and its weights are trained), got {rate!r}")


def check_lora(config) -> None:
    """The LoRA settings (ConfigError naming the setting)."""
    try:
        lora = lora_config_from(config)
    except (ValueError, TypeError) as e:  # LoRAConfig's own checks: "lora.rank: ..."
        raise ConfigError(f"{e}") from e
    if lora is not None and not config.model_name_or_path:
        raise ConfigError("lora.enabled: LoRA trains adapters on a frozen base model; give the base with "
                          "--model_name_or_path (an Orbax run, a Hugging Face directory or a LoRA run)")


def checked_model_config(config) -> LLaDAConfig:
    try:
        return model_config_from(config)
    except (ValueError, TypeError) as e:  # LLaDAConfig's own checks, e.g. "LLaDAConfig.remat_policy: ..."
        raise ConfigError(str(e).replace("LLaDAConfig.", "model.", 1)) from e


def resolve_model_config(config) -> LLaDAConfig:
    """The model config of the run: config.model, with the architecture of `model_name_or_path` if given, checked
    (block diffusion, the special ids; an unset pad id is the EOS, LLaDA's convention)."""
    model_config = checked_model_config(config)
    source = "model"
    if config.model_name_or_path:
        from llada_jax.checkpoints import read_model_config

        try:
            pretrained = read_model_config(config.model_name_or_path)
        except ValueError as e:
            raise ConfigError(f"model_name_or_path {config.model_name_or_path}: {e}") from e
        model_config = model_config.replace(**{f: getattr(pretrained, f) for f in ARCHITECTURE_FIELDS})
        default = LLaDAConfig()
        try:
            model_config = model_config.replace(**{
                f: getattr(pretrained, f) for f in ADAPTABLE_FIELDS if getattr(model_config, f) == getattr(default, f)})
        except ValueError as e:
            raise ConfigError(f"model_name_or_path {config.model_name_or_path}: {e}".replace("LLaDAConfig.", "model.")
                              ) from e
        source = layout.model_config_file(config.model_name_or_path)
    check_block_diffusion(config, model_config)
    # Training needs the mask token and the EOS; an AR checkpoint's config.json may leave its ids null
    # (transformers 5 writes null for every id it was not given), and nothing else names them.
    for name, use in (("mask_token_id", "the forward process replaces tokens with it"),
                      ("eos_token_id", "documents are joined with it, SFT answers and pad-mode rows padded with it")):
        if getattr(model_config, name) is None:
            if source == "model":
                raise ConfigError(f"model.{name} is not set: training needs it ({use})")
            raise ConfigError(f"{source}: {name} is not set: training needs it ({use}); set {name} there")
    if model_config.pad_token_id is None:
        model_config = model_config.replace(pad_token_id=model_config.eos_token_id)
    return model_config


def make_run_mesh(config, model_config: LLaDAConfig, devices=None) -> jax.sharding.Mesh:
    """The run's mesh, after checking that the model fits its tensor and expert axes (`sharding.check_model_fits`)
    and that the global batch splits over its data axes and the processes."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = sharding.mesh_shape(config.mesh, len(devices))
    sharding.check_model_fits(sizes, model_config)
    mesh = sharding.make_mesh(sizes, devices)
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    dp = sharding.data_parallel_size(rules, mesh)
    if config.batch_size % dp:
        raise MeshError(f"batch_size {config.batch_size} is not divisible by the {dp} data-parallel shards of "
                        f"mesh {dict(mesh.shape)}: give a multiple of {dp} (the same sequences per update with "
                        f"fewer gradient_accumulation_steps), or put devices on the tensor axis")
    if config.batch_size % jax.process_count():
        raise MeshError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
    return mesh


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class TrainingRun:
    """Everything a running training job holds, and the named pieces of one iteration of its loop."""

    config: object
    model_config: LLaDAConfig
    mesh: jax.sharding.Mesh
    trainer: Trainer
    data: object  # the training iterator (llada_jax.data.pipeline)
    manager: object  # the Orbax CheckpointManager of output_dir
    logger: MetricsLogger
    state: object  # TrainState
    start: int  # the step the run starts after (0, or the resumed step)
    lora_item: dict | None = None  # LoRA: the settings and the pinned base every save records (`adapters.lora_item`)

    @classmethod
    def open(cls, config, overridden=()) -> "TrainingRun":
        model_config = validate(config, overridden)  # (a missing model_name_or_path is a ConfigError naming it)
        from llada_jax.data.pipeline import make_train_iterator

        start_from = config.model_name_or_path
        if not config.data.tokenizer or (start_from and storage.clean(config.data.tokenizer) == storage.clean(
                start_from)):  # the tokenizer stored with the run or with the starting checkpoint
            from llada_jax.checkpoints import model_tokenizer

            stored = layout.tokenizer_path(config.output_dir) if storage.is_dir(config.output_dir) else None
            if stored is None and start_from:  # (an AR model's gets its mask token)
                stored = model_tokenizer(start_from)
            config.data.tokenizer = stored or ""
        storage.check_writable(config.output_dir, f".llada_jax_write_check_{jax.process_index()}")
        lora = lora_config_from(config)  # (checked by validate)
        # LoRA: the base resolved once (an Orbax run pinned to its step), then loaded from and named by every save
        lora_item = None if lora is None else adapters.lora_item(lora, config.model_name_or_path)
        start = checkpoint.check_resumable(config.output_dir, config.seed, config.checkpoint.restore_step,
                                           lora_item=lora_item)
        config.model.update(model_config.to_dict())
        mesh = make_run_mesh(config, model_config)
        storage.makedirs(config.output_dir)
        trainer = Trainer(config, model_config, mesh)
        with contextlib.ExitStack() as on_error:  # closed (data workers, Orbax threads) unless open() succeeds
            data = make_train_iterator(config, model_config, process_index=jax.process_index(),
                                       process_count=jax.process_count())
            on_error.callback(data.close)
            manager = checkpoint_manager(config.output_dir, keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
            on_error.callback(manager.close)
            state, start = cls._initial_state(config, model_config, mesh, trainer, data, manager, start, lora_item)
            on_error.pop_all()
        is_main = jax.process_index() == 0
        if is_main:
            write_json(storage.join(config.output_dir, layout.RUN_CONFIG), config.to_dict())
            if config.data.tokenizer:
                copy_dir(config.data.tokenizer, storage.join(config.output_dir, layout.TOKENIZER),
                         last=layout.TOKENIZER_MARKERS)
        logger = MetricsLogger(config.output_dir, enabled=is_main, wandb_config=config.wandb,
                               run_config=config.to_dict())
        logger.truncate_after(start)
        return cls(config, model_config, mesh, trainer, data, manager, logger, state, start, lora_item)

    @staticmethod
    def _initial_state(config, model_config, mesh, trainer, data, manager, start, lora_item):
        """(state, step): resumed from step `start` of output_dir, else from model_name_or_path, else new. With
        LoRA, the base (`lora_item["base"]`, model_name_or_path pinned) is frozen and loaded in every case; the
        adapters are resumed or new."""
        from flax import nnx

        starting = None
        if config.model_name_or_path and (start is None or trainer.lora is not None):
            from llada_jax.checkpoints import load_pretrained

            # (a LoRA run as the starting model is merged: its adapters are part of the weights started from)
            path = config.model_name_or_path if lora_item is None else lora_item["base"]
            starting = load_pretrained(path, mesh=mesh, rules=trainer.rules, merge_lora=True,
                                       param_dtype=model_config.param_dtype, scan_layers=model_config.scan_layers)
            if trainer.lora is not None:
                trainer.set_frozen(starting)
                log.info("LoRA adapters on the frozen base %s", config.model_name_or_path)
        if start is not None:
            state = checkpoint.restore(manager, start, trainer.abstract_state(), data)
            later = [s for s in manager.all_steps() if s > start]
            for step in later:  # superseded: the run continues from `start` (checkpoint.restore_step)
                manager.delete(step)
            if later:
                log.warning("resuming from step %d: deleted the later checkpoint steps %s", start, later)
            log.info("resumed from %s step %d", config.output_dir, start)
            return state, start
        if starting is not None and trainer.lora is None:
            state = trainer.state_from_params(nnx.to_pure_dict(nnx.state(starting, nnx.Param)))
            log.info("initialised parameters from %s", config.model_name_or_path)
        else:  # new parameters, or new adapters on the base
            state = trainer.init_state(int(config.seed))
        return state, 0

    def step(self) -> dict:
        """One optimizer step over the next `gradient_accumulation_steps` micro-batches; returns its metrics
        (device arrays, not waited for)."""
        from llada_jax.data.pipeline import global_batch

        micro = [next(self.data) for _ in range(self.config.gradient_accumulation_steps)]
        local = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        batch = global_batch(local, self.mesh, self.trainer.batch_sharding.spec)
        self.state, metrics = self.trainer.step(self.state, batch)
        return metrics

    def evaluate(self, step: int) -> None:
        """The mean loss over the first `eval_batches` batches of `eval_data_path` (the same batches and the same
        noise every time, so evaluations are comparable), logged as `eval_loss`."""
        from llada_jax.data.pipeline import global_batch, make_train_iterator

        c = self.config
        eval_config = c.copy_and_resolve_references()
        eval_config.data_path, eval_config.data.shuffle, eval_config.gradient_accumulation_steps = (
            c.eval_data_path, False, 1)
        data = make_train_iterator(eval_config, self.model_config, process_index=jax.process_index(),
                                   process_count=jax.process_count())
        try:
            losses = []
            for index in range(c.eval_batches):
                local = {k: v[None] for k, v in next(data).items()}
                batch = global_batch(local, self.mesh, self.trainer.batch_sharding.spec)
                losses.append(self.trainer.eval_loss(self.state.params, batch, index))
            value = float(np.mean([host_scalar(x) for x in losses]))
        finally:
            data.close()
        log.info("step %d: eval_loss %.4f", step, value)
        self.logger.log(step, {"eval_loss": value})

    def save(self, step: int) -> None:
        if not params_all_finite(self.state.params):
            log.error("step %d: parameters are not finite; checkpoint NOT written", step)
            return
        checkpoint.save(self.manager, self.state, model_config=self.model_config, config=self.config, data=self.data,
                        lora_item=self.lora_item)
        self.logger.sync()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self.logger.close()
        self.data.close()


class StepLog:
    """Reads and logs step metrics without stalling the device: a step's metrics are read once the next step
    has been dispatched, except on logging steps, which are waited for so the timing covers whole steps."""

    def __init__(self, run: TrainingRun, max_steps: int):
        c = run.config
        self.run, self.max_steps = run, max_steps
        self.tokens_per_step = c.gradient_accumulation_steps * c.batch_size * c.max_length
        self.flops_per_step = flops_per_token(run.model_config, c.max_length, run.trainer.lora) * self.tokens_per_step
        self.peak = peak_flops_per_device()
        self.pending = None  # (step, metrics, seconds per step) not read yet
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.last: dict = {}
        self.progress = _progress_bar(jax.process_index() == 0, run.start, max_steps)

    def record(self, step: int, metrics: dict) -> None:
        self.window_steps += 1
        if self.pending is not None:
            self._read(*self.pending)
            self.pending = None
        due = step % self.run.config.logging_steps == 0 or step == self.max_steps
        if due:
            jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - self.window_start) / self.window_steps
        if due:
            self._read(step, metrics, seconds)
            self.window_start, self.window_steps = time.perf_counter(), 0
        else:
            self.pending = (step, metrics, seconds)
        self.progress.update(1)

    def flush(self) -> None:
        if self.pending is not None:
            self._read(*self.pending)
            self.pending = None

    def _read(self, step: int, metrics: dict, seconds: float) -> None:
        c = self.run.config
        m = {k: host_scalar(v) for k, v in metrics.items()}
        if m["update_skipped"]:
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step,
                        m["nonfinite_streak"])
        if step % c.logging_steps == 0 or step == self.max_steps:
            row = {"loss": m["loss"], "learning_rate": m["learning_rate"], "grad_norm": m["grad_norm"],
                   "tokens_per_sec": self.tokens_per_step / seconds, "step_time": seconds,
                   "tflops_per_sec": self.flops_per_step / seconds / 1e12,
                   "masked_tokens": m["masked_tokens"], "skipped_updates": m["nonfinite_total"],
                   "batch_checksum": m["batch_checksum"]}
            if self.peak:
                row["mfu"] = self.flops_per_step / seconds / (self.peak * jax.device_count())
            row.update({k: v for k, v in m.items() if k.startswith("moe_")})  # (router_metrics: MoE models)
            self.run.logger.log(step, row)
            self.last = {"step": step, **row}
            self.progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['learning_rate']:.2e}", refresh=False)
        if m["nonfinite_streak"] >= c.max_consecutive_nonfinite:
            raise TrainingStopped(
                f"stopping at step {step}: {m['nonfinite_streak']} consecutive steps had a non-finite loss or "
                f"gradient (max_consecutive_nonfinite={c.max_consecutive_nonfinite}); the last checkpoint holds "
                f"the last finite parameters")

    def close(self) -> None:
        self.progress.close()


def train(config, *, on_step: Callable[[int], None] | None = None, overridden=()) -> dict:
    """Run (or resume) training as configured; returns the last logged metrics. `overridden`: as for `validate`."""
    run = TrainingRun.open(config, overridden)
    max_steps = int(config.max_steps)
    if run.start >= max_steps:
        log.info("%s is already at step %d >= max_steps %d: nothing to do", config.output_dir, run.start, max_steps)
        run.close()
        return {}
    steps = StepLog(run, max_steps)
    preemption = _Preemption()
    try:
        for step in range(run.start + 1, max_steps + 1):
            steps.record(step, run.step())
            if config.eval_data_path and (step % config.eval_steps == 0 or step == max_steps):
                steps.flush()
                run.evaluate(step)
            if step % config.save_steps == 0 or step == max_steps or preemption.requested:
                run.save(step)
            if on_step is not None:
                on_step(step)
            if preemption.requested:
                log.warning("SIGTERM: saved step %d and stopping", step)
                break
        steps.flush()
    finally:
        steps.close()
        run.close()
    return steps.last


def _progress_bar(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm

    # On a terminal the bar redraws in place; in a log file (no TTY) an update every 30 s is plenty.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=interval)
