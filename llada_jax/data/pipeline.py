"""The training input pipeline: records -> shuffled, sharded, tokenized, batched numpy, on Grain.

    source (JSONL / TFDS)                 random access, every record once per epoch
      [process_index::process_count]      this process's slice: it reads nothing else
      .shuffle(seed).repeat()             a new order each epoch (Grain folds the epoch into the seed)
      .map(PretrainFormat | SftFormat)    parse, validate, tokenize (in worker processes when num_workers > 0)
      .to_iter_dataset(read_threads)
      .mp_prefetch(num_workers)           optional worker processes
      RowBatcher                          concat / pad / sft rows, local batches, exact state
      ThreadPrefetch(prefetch_buffer_size)   batches assembled ahead in a background thread

`make_train_iterator(config, model_config, process_index=, process_count=)` returns the iterator: each
`next()` is this process's slice of one global micro-batch as numpy int32 arrays. Its `get_state()` /
`set_state()` (and Grain's Orbax `CheckpointSave` / `CheckpointRestore`) restore the stream exactly, mid-epoch
and mid-document. `global_batch(local, mesh, spec)` assembles the global `jax.Array`s on a device mesh.
`pipeline_stats(iterator)` gives the records read and what was skipped.
"""

from __future__ import annotations

import atexit
import logging
import weakref

import grain
import ml_collections
import numpy as np

from llada_jax.config import LLaDAConfig
from llada_jax.data.batching import RowBatcher, RowBatcherIterator
from llada_jax.data.formats import PRETRAIN_MODES, TOO_LONG_POLICIES, PretrainFormat, SftFormat
from llada_jax.data.sources import open_source
from llada_jax.data.tokenizer import check_compatible, load_tokenizer

log = logging.getLogger(__name__)

TASKS = ("pretrain", "sft")


def make_dataset(config: ml_collections.ConfigDict, model_config: LLaDAConfig, *, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """The Grain dataset behind `make_train_iterator` (see the module docstring)."""
    data = config.data
    task = config.task
    if task not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {task!r}")
    if not config.data_path:
        raise ValueError("config.data_path is empty: give JSONL file(s), a glob, a directory or tfds:NAME:SPLIT")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if config.batch_size <= 0 or config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} (global) must be a positive multiple of the process "
                         f"count {process_count}")
    if data.pretrain_mode not in PRETRAIN_MODES:
        raise ValueError(f"data.pretrain_mode must be one of {PRETRAIN_MODES}, got {data.pretrain_mode!r}")
    if data.too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"data.too_long must be one of {TOO_LONG_POLICIES}, got {data.too_long!r}")
    if config.max_length > model_config.max_sequence_length:
        raise ValueError(f"max_length {config.max_length} exceeds the model's max_sequence_length "
                         f"{model_config.max_sequence_length}")

    helper = load_tokenizer(data.tokenizer)
    if helper is not None:
        check_compatible(helper, model_config)
    cache = {"": "default", "off": None}.get(data.index_cache_dir, data.index_cache_dir)
    source = open_source(config.data_path, tfds_data_dir=data.tfds_data_dir or None, index_cache_dir=cache,
                         skip_empty_files=data.skip_invalid)
    if len(source) < process_count:
        raise ValueError(f"{config.data_path}: {len(source)} records cannot be split over {process_count} processes")
    for path in getattr(source, "empty_files", []):
        log.warning("data: skipped %s (no records)", path)

    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    records = len(ds)
    if data.shuffle:
        ds = ds.shuffle(seed=int(config.seed) % 2**32)
    ds = ds.repeat(None)

    ids = dict(vocab_size=model_config.padded_vocab_size, mask_token_id=model_config.mask_token_id,
               eos_token_id=model_config.eos_token_id, bos_token_id=model_config.bos_token_id,
               tokenizer=helper, skip_invalid=data.skip_invalid)
    if task == "pretrain":
        fmt, mode = PretrainFormat(**ids), data.pretrain_mode
    else:
        fmt, mode = SftFormat(max_length=config.max_length, too_long=data.too_long, **ids), "sft"
    ds = ds.map(fmt)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                              prefetch_buffer_size=max(1, data.worker_buffer_size)))
    if data.num_workers > 0:
        mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers,
                                                         per_worker_buffer_size=data.worker_buffer_size))
    ds = RowBatcher(ds, mode=mode, max_length=config.max_length, batch_size=config.batch_size // process_count,
                    pad_id=model_config.eos_token_id, records_per_epoch=records,
                    empty_files=getattr(source, "empty_files", ()),
                    signature={"mode": mode, "num_workers": data.num_workers, "process_index": process_index,
                               "process_count": process_count, "data_path": config.data_path, "records": len(source),
                               "seed": int(config.seed), "shuffle": bool(data.shuffle)})
    if data.prefetch_buffer_size > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data.prefetch_buffer_size)
    return ds


def make_train_iterator(config: ml_collections.ConfigDict, model_config: LLaDAConfig, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """This process's iterator over local micro-batches: {"input_ids": int32 [B / P, max_length]} and, for
    SFT, "prompt_lengths" and "answer_lengths" int32 [B / P] (B = config.batch_size, P = process_count).

    Save and restore it with `get_state()` / `set_state()` or, inside an Orbax composite,
    `grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)`. Close it (`it.close()`)
    when done if it has worker processes.
    """
    iterator = iter(make_dataset(config, model_config, process_index=process_index, process_count=process_count))
    _LIVE_ITERATORS.add(iterator)
    return iterator


# Iterators still open at exit are closed while the interpreter is intact. Grain's ThreadPrefetchDatasetIterator
# (ours, and the ones its interleave makes per worker) closes again from __del__ during interpreter shutdown,
# when its module globals are gone, and prints an AttributeError; a closed one is made to return at once.
_LIVE_ITERATORS: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for iterator in list(_LIVE_ITERATORS):
        try:
            iterator.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _make_close_idempotent(cls) -> None:
    close = cls.close
    if getattr(close, "_idempotent", False):
        return

    def idempotent_close(self):
        if getattr(self, "_llada_closed", False):
            return
        self._llada_closed = True
        close(self)

    idempotent_close._idempotent = True
    cls.close = idempotent_close


_make_close_idempotent(grain.experimental.ThreadPrefetchDatasetIterator)


def global_batch(local_batch: dict, mesh, spec) -> dict:
    """The global batch as `jax.Array`s sharded on `mesh`, built from every process's local batch.

    `spec` is the PartitionSpec of the [batch, length] arrays (e.g. `P(("data", "fsdp"), None)`); 1-D
    arrays (prompt_lengths, answer_lengths) use its first entry. Each process passes its own slice
    (`jax.make_array_from_process_local_data`), in process order along the batch dimension.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        sharding = NamedSharding(mesh, PartitionSpec(*tuple(spec)[:value.ndim]))
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def pipeline_stats(iterator: grain.DatasetIterator) -> dict:
    """Records read, batches made and skip events so far (counts and the first locations) of an iterator
    from `make_train_iterator` (read-ahead by prefetching included)."""
    todo = [iterator]
    while todo:
        it = todo.pop()
        if isinstance(it, RowBatcherIterator):
            return it.stats
        todo.extend(getattr(it, "_parents", ()))
    raise ValueError(f"{iterator} is not a make_train_iterator iterator")


def mark_absl_flags_parsed() -> None:
    """Grain reads absl flags; outside an absl program they must be marked parsed before worker processes
    start, or they fail with UnparsedFlagAccessError (the CLI does this too)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
