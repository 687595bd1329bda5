"""The data settings of a run config, checked in one place, and the process set-up Grain needs.

`check_config(config, model_config, process_count=)` checks everything about the data section that can be
checked without reading data (task, pretrain_mode, too_long, pad_multiple, max_length against the model, the shard
layout)
and returns the number of row streams. The training loop calls it at start-up, the pipeline again when it
builds a dataset, so both report a bad setting with the same one-line message naming the field.

`mark_absl_flags_parsed()` prepares a program that is not an absl app for Grain's worker processes.

This module is cheap to import (no Grain, no JAX): the `llada-jax` command uses it before any work.
"""

from __future__ import annotations

from llada_jax.data.formats import PRETRAIN_MODES, TOO_LONG_POLICIES

TASKS = ("pretrain", "sft")


def check_config(config, model_config=None, *, process_count: int = 1) -> int:
    """Checks the data settings of a training config; returns the number of row streams (`num_shards`).

    `model_config`: the model the batches are for (an `LLaDAConfig`; by default `config.model`), whose
    `max_sequence_length` bounds `max_length`. `process_count`: how many processes will read the data.
    Raises ValueError with a one-line message that names the config field.
    """
    if config.task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {config.task!r}")
    data = config.data
    if data.pretrain_mode not in PRETRAIN_MODES:
        raise ValueError(f"data.pretrain_mode: expected one of {PRETRAIN_MODES}, got {data.pretrain_mode!r}")
    if data.too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"data.too_long: expected one of {TOO_LONG_POLICIES}, got {data.too_long!r}")
    model = config.model if model_config is None else model_config
    if config.max_length > model.max_sequence_length:
        raise ValueError(f"max_length {config.max_length} exceeds the model's max_sequence_length "
                         f"{model.max_sequence_length}")
    multiple = data.pad_multiple
    if not isinstance(multiple, int) or isinstance(multiple, bool) or not 0 <= multiple <= config.max_length:
        raise ValueError(f"data.pad_multiple: expected an integer in [0, max_length {config.max_length}] (0: the "
                         f"model's block_size for block_causal models, else 1), got {multiple!r}")
    return num_shards(config, process_count)


def pad_multiple(config, model_config=None) -> int:
    """What packed SFT examples' answers are EOS-padded to a multiple of: `data.pad_multiple`, or when it is 0 the
    model's `block_size` for a block_causal model (its answer blocks are then whole, as generation makes them) and
    1 otherwise (the answer and one EOS)."""
    model = config.model if model_config is None else model_config
    if config.data.pad_multiple:
        return int(config.data.pad_multiple)
    return int(model.block_size) if model.attention_type == "block_causal" else 1


def num_shards(config, process_count: int) -> int:
    """The number of row streams S that make up each global micro-batch: `data.num_shards`, or one per row
    (S = batch_size) when it is 0. The data order depends on S, never on the process count, which must divide
    S (each process runs the streams of its rows)."""
    shards = int(config.data.num_shards) or int(config.batch_size)
    if not config.data.num_shards and shards > 0 and shards % process_count:
        raise ValueError(f"batch_size {shards} (global) must be a multiple of the process count {process_count}: "
                         f"each process reads the rows of its part of the batch")
    if shards <= 0 or shards % process_count:
        raise ValueError(f"data.num_shards {shards} must be a positive multiple of the process count {process_count}")
    check_batch_size(config.batch_size, shards)
    return shards


def check_batch_size(batch_size: int, shards: int) -> None:
    """Each row stream makes an equal part of the global batch, so `batch_size` must be a multiple of `shards`."""
    if batch_size <= 0 or batch_size % shards:
        raise ValueError(f"batch_size {batch_size} (global) must be a positive multiple of the "
                         f"{shards} data row streams (data.num_shards)")


def mark_absl_flags_parsed() -> None:
    """Marks absl's flags parsed unless they already are.

    Grain reads absl flags, and in a program that is not an absl app (the `llada-jax` command, a notebook,
    a test) they have not been parsed: every worker process would then fail with UnparsedFlagAccessError.
    Call it before worker processes start; the pipeline does when `data.num_workers > 0`.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
