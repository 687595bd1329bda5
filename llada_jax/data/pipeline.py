"""The training input pipeline: records -> shuffled, sharded, tokenized, batched numpy, on Grain.

    source (JSONL / TFDS)                 random access, every record once per epoch
      [shard::num_shards]                 one shard's records; a process reads only its shards
      .shuffle(seed).repeat()             a new order each epoch (Grain folds the epoch into the seed)
      .map(PretrainFormat | SftFormat)    parse, validate, tokenize (in worker processes when num_workers > 0)
      .to_iter_dataset(read_threads)
      .mp_prefetch(num_workers)           optional worker processes
      RowBatcher                          concat / pad / sft rows, local batches, exact state
      ThreadPrefetch(prefetch_buffer_size)   batches assembled ahead in a background thread
    ShardedIterator                       this process's shards' rows, concatenated in shard order

`make_train_iterator(config, model_config, process_index=, process_count=)` returns the iterator: each
`next()` is this process's slice of one global micro-batch as numpy int32 arrays. Its `get_state()` /
`set_state()` (and Grain's Orbax `CheckpointSave` / `CheckpointRestore`) restore the stream exactly, mid-epoch
and mid-document. `global_batch(local, mesh, spec)` assembles the global `jax.Array`s on a device mesh.
`pipeline_stats(iterator)` gives the records read and what was skipped. The config is checked first, by
`settings.check_config`.

Closing: `it.close()` (or `with make_train_iterator(...) as it:`) stops the prefetch threads and worker
processes and lets go of the Grain iterators. Iterators still open at exit are closed by an atexit hook,
`close_open_iterators`, while the interpreter is intact: a Grain thread-prefetch iterator that lives on into
interpreter shutdown closes itself from `__del__` after its module's globals are gone and prints an
AttributeError (grain 0.2.18), and worker processes left running leak their shared memory.
"""

from __future__ import annotations

import atexit
import gc
import logging
import weakref

import grain
import ml_collections
import numpy as np

from llada_jax.config import LLaDAConfig
from llada_jax.data.batching import RowBatcher
from llada_jax.data.formats import PretrainFormat, SftFormat
from llada_jax.data.settings import (
    check_batch_size,
    check_config,
    mark_absl_flags_parsed,
)
from llada_jax.data.sources import open_source
from llada_jax.tokenizer import check_compatible, load_tokenizer

log = logging.getLogger(__name__)

_LOAD = object()  # make_dataset's default tokenizer: load data.tokenizer


def _checked_tokenizer(config: ml_collections.ConfigDict, model_config: LLaDAConfig):
    """The TokenizerHelper of data.tokenizer (None without one), checked against the model config."""
    helper = load_tokenizer(config.data.tokenizer)
    if helper is not None:
        check_compatible(helper, model_config)
    return helper


def make_dataset(config: ml_collections.ConfigDict, model_config: LLaDAConfig, *, shard: int = 0,
                 shards: int = 1, source=None, tokenizer=_LOAD) -> grain.IterDataset:
    """One shard's Grain dataset: records [shard::shards], batches of batch_size / shards rows, read ahead
    by a thread when data.prefetch_buffer_size > 0 (see the module docstring). `source` and `tokenizer`
    reuse an opened source and a loaded, checked tokenizer (every shard of a process shares them)."""
    ds = _row_batches(config, model_config, shard=shard, shards=shards, source=source, tokenizer=tokenizer)
    if config.data.prefetch_buffer_size > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.data.prefetch_buffer_size)
    return ds


def _row_batches(config: ml_collections.ConfigDict, model_config: LLaDAConfig, *, shard: int, shards: int,
                 source, tokenizer) -> RowBatcher:
    """make_dataset's pipeline up to the RowBatcher (without the prefetch thread)."""
    check_config(config, model_config)
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in [0, {shards})")
    check_batch_size(config.batch_size, shards)
    data = config.data
    task = config.task

    helper = _checked_tokenizer(config, model_config) if tokenizer is _LOAD else tokenizer
    source = source if source is not None else open_data_source(config)
    if len(source) < shards:
        raise ValueError(f"{config.data_path}: {len(source)} records cannot be split into {shards} data shards")

    ds = grain.MapDataset.source(source)
    if shards > 1:
        ds = ds[shard::shards]
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
    ds = RowBatcher(ds, mode=mode, max_length=config.max_length, batch_size=config.batch_size // shards,
                    pad_id=model_config.eos_token_id, records_per_epoch=records,
                    empty_files=getattr(source, "empty_files", ()),
                    signature={"mode": mode, "num_workers": data.num_workers, "shard": shard, "num_shards": shards,
                               "data_path": config.data_path, "records": len(source),
                               "seed": int(config.seed), "shuffle": bool(data.shuffle)})
    return ds


def open_data_source(config: ml_collections.ConfigDict):
    if not config.data_path:
        raise ValueError("config.data_path is empty: give JSONL file(s), a glob, a directory or tfds:NAME:SPLIT")
    data = config.data
    cache = {"": "default", "off": None}.get(data.index_cache_dir, data.index_cache_dir)
    source = open_source(config.data_path, tfds_data_dir=data.tfds_data_dir or None, index_cache_dir=cache,
                         skip_empty_files=data.skip_invalid)
    for path in getattr(source, "empty_files", []):
        log.warning("data: skipped %s (no records)", path)
    return source


def make_train_iterator(config: ml_collections.ConfigDict, model_config: LLaDAConfig, *, process_index: int = 0,
                        process_count: int = 1) -> "ShardedIterator":
    """This process's iterator over local micro-batches: {"input_ids": int32 [B / P, max_length]} and, for
    SFT, "prompt_lengths" and "answer_lengths" int32 [B / P] (B = config.batch_size, P = process_count).

    The global micro-batch is the concatenation of `num_shards` independent row streams (shard s reads
    records s::num_shards and contributes rows [s B/S, (s+1) B/S)); process p runs shards
    [p S/P, (p+1) S/P), so its rows are rows [p B/P, (p+1) B/P) of the global batch. With a fixed
    `data.num_shards` the global batches do not depend on how many processes read them.

    Save and restore it with `get_state()` / `set_state()` (a dict of per-shard states, which another
    process layout over the same shards can restore), or inside an Orbax composite with
    `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` (per-process files). Close it
    (`it.close()`, or use it as a context manager) when done; one left open is closed at exit.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    shards = check_config(config, model_config, process_count=process_count)
    per_process = shards // process_count
    source = open_data_source(config)
    helper = _checked_tokenizer(config, model_config)
    mine = range(process_index * per_process, (process_index + 1) * per_process)
    batchers = {s: iter(_row_batches(config, model_config, shard=s, shards=shards, source=source, tokenizer=helper))
                for s in mine}
    return ShardedIterator(batchers, prefetch_buffer_size=config.data.prefetch_buffer_size)


class ShardedIterator(grain.DatasetIterator):
    """Concatenates one micro-batch from each of this process's shard iterators, in shard order.

    `batchers`: {shard: RowBatcherIterator}; with `prefetch_buffer_size` > 0 each is read ahead by a Grain
    thread-prefetch iterator. The shard iterators are held here only (not as Grain parents), so `close()` can
    let go of them: they are freed while the interpreter is intact, not during its shutdown.
    """

    def __init__(self, batchers: dict, *, prefetch_buffer_size: int = 0):
        super().__init__()
        self._batchers = dict(batchers)  # read directly by `stats`
        self._shards = {s: grain.experimental.ThreadPrefetchDatasetIterator(b, prefetch_buffer_size)
                        if prefetch_buffer_size > 0 else b for s, b in self._batchers.items()}
        self._final_stats = None  # the stats when it was closed
        _OPEN_ITERATORS.add(self)

    def __next__(self) -> dict:
        self._assert_not_closed()
        parts = [next(it) for it in self._shards.values()]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def __enter__(self) -> "ShardedIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> dict:
        """Records read, batches made and skip events so far, summed over the shards (see `pipeline_stats`)."""
        if self._closed:
            return self._final_stats
        found = [b.stats for b in self._batchers.values()]
        if len(found) == 1:
            return found[0]
        total = {"records": sum(f["records"] for f in found), "batches": found[0]["batches"], "skipped": {},
                 "skip_examples": [e for f in found for e in f["skip_examples"]],
                 "empty_files": found[0]["empty_files"]}
        for f in found:
            for reason, n in f["skipped"].items():
                total["skipped"][reason] = total["skipped"].get(reason, 0) + n
        return total

    def start_prefetch(self) -> None:
        for it in self._shards.values():
            it.start_prefetch()

    def get_state(self) -> dict:
        return {"shards": {str(s): it.get_state() for s, it in self._shards.items()}}

    def set_state(self, state: dict) -> None:
        saved = state.get("shards", {})
        missing = [s for s in self._shards if str(s) not in saved]
        if missing:
            raise ValueError(f"cannot restore the data iterator: the saved state has shards {sorted(saved)}, "
                             f"not this process's shards {missing} (a different data.num_shards?)")
        for s, it in self._shards.items():
            it.set_state(saved[str(s)])

    def close(self) -> None:
        """Stops the prefetch threads and worker processes and drops the shard iterators (`stats` keeps
        their last counts). Idempotent: Grain's `DatasetIterator.__del__` calls it again."""
        if self._closed:
            return
        self._final_stats = self.stats
        self._closed = True
        shards, self._shards, self._batchers = self._shards, {}, {}
        for it in shards.values():
            it.close()


# Every ShardedIterator still alive, held weakly: one nobody refers to any more is closed by Grain's
# DatasetIterator.__del__ when it is collected; the others are closed by close_open_iterators at exit.
_OPEN_ITERATORS: "weakref.WeakSet[ShardedIterator]" = weakref.WeakSet()


@atexit.register
def close_open_iterators() -> None:
    """Closes every iterator from `make_train_iterator` (every ShardedIterator) that is still open. The Grain
    iterators they held are freed as they let go of them (a collection frees any kept alive by a reference
    cycle). Registered with atexit: at exit it runs before the interpreter tears its modules down (see the
    module docstring)."""
    for iterator in list(_OPEN_ITERATORS):
        try:
            iterator.close()
        except Exception:  # noqa: BLE001 - closing the others matters more than one failure
            log.warning("data: closing %s failed", iterator, exc_info=True)
    gc.collect()


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


def pipeline_stats(iterator) -> dict:
    """Records read, batches made and skip events so far (counts and the first locations) of an iterator
    from `make_train_iterator` (read-ahead by prefetching included), summed over its shards."""
    if not isinstance(iterator, ShardedIterator):
        raise ValueError(f"{iterator} is not a make_train_iterator iterator")
    return iterator.stats
