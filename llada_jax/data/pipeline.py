"""The training input pipeline: records -> shuffled, tokenized rows of process-count-independent row streams.

    source (JSONL / TFDS)                  random access, every record once per epoch
      .shuffle(seed).repeat()              the record order: a new permutation each epoch (data.shuffle)
    StreamRecords(streams, starts)         this process's row streams' records, interleaved (stream s reads
                                           records s, s + S, s + 2S, ... of the order)
      .map(PretrainFormat | SftFormat)     parse, validate, tokenize (in worker processes when num_workers > 0)
      .to_iter_dataset(read_threads)
      .mp_prefetch(num_workers)            optional worker processes
    StreamBatcher                          concat / pad / sft rows per stream, local batches, exact state
      ThreadPrefetch(prefetch_buffer_size) batches assembled ahead in a background thread

`make_train_iterator(config, model_config, process_index=, process_count=)` returns the iterator: each
`next()` is this process's slice of one global micro-batch as numpy int32 arrays. The global micro-batch of
step s depends on (data, seed, data.num_shards, s) only, never on the number of processes or devices (see
`batching`). Its `get_state()` / `set_state()` (and Grain's Orbax `CheckpointSave` / `CheckpointRestore`)
restore the stream exactly, mid-epoch and mid-document; the states of all processes merged (`merge_states`)
restore under any process count. `global_batch(local, mesh, spec)` assembles the global `jax.Array`s on a
device mesh. `pipeline_stats(iterator)` gives the records read and what was skipped. The config is checked
first, by `settings.check_config`.

Closing: `it.close()` (or `with make_train_iterator(...) as it:`) stops the prefetch thread and worker
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
from llada_jax.data.batching import StreamBatcher, StreamBatcherIterator, StreamRecords
from llada_jax.data.formats import PretrainFormat, SftFormat
from llada_jax.data.settings import check_config, mark_absl_flags_parsed, pad_multiple
from llada_jax.data.sources import open_source
from llada_jax.tokenizer import check_compatible, load_tokenizer

log = logging.getLogger(__name__)

def _checked_tokenizer(config: ml_collections.ConfigDict, model_config: LLaDAConfig):
    """The TokenizerHelper of data.tokenizer (None without one), checked against the model config. A URL is
    downloaded once per process (`storage.local_copy`: AutoTokenizer reads only local files)."""
    from llada_jax.checkpoints import storage

    tokenizer = config.data.tokenizer
    helper = load_tokenizer(storage.local_copy(tokenizer) if tokenizer else tokenizer)
    if helper is not None:
        check_compatible(helper, model_config)
    return helper


def make_dataset(config: ml_collections.ConfigDict, model_config: LLaDAConfig, *, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """This process's Grain dataset of local micro-batches (see the module docstring): the `StreamBatcher` of
    its row streams, read ahead by a thread when data.prefetch_buffer_size > 0."""
    ds = stream_batcher(config, model_config, process_index=process_index, process_count=process_count)
    if config.data.prefetch_buffer_size > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.data.prefetch_buffer_size)
    return ds


def stream_batcher(config: ml_collections.ConfigDict, model_config: LLaDAConfig, *, process_index: int = 0,
                   process_count: int = 1) -> StreamBatcher:
    """`make_dataset` without the read-ahead thread."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    num_streams = check_config(config, model_config, process_count=process_count)
    per_process = num_streams // process_count
    streams = list(range(process_index * per_process, (process_index + 1) * per_process))
    data = config.data
    helper = _checked_tokenizer(config, model_config)
    source = open_data_source(config)
    order = grain.MapDataset.source(source)
    if data.shuffle:
        order = order.shuffle(seed=int(config.seed) % 2**32)
    order = order.repeat(None)

    ids = dict(vocab_size=model_config.padded_vocab_size, mask_token_id=model_config.mask_token_id,
               eos_token_id=model_config.eos_token_id, bos_token_id=model_config.bos_token_id,
               tokenizer=helper, skip_invalid=data.skip_invalid)
    if config.task == "pretrain":
        fmt, mode = PretrainFormat(**ids), data.pretrain_mode
    else:
        fmt, mode = SftFormat(max_length=config.max_length, too_long=data.too_long, **ids), "sft"

    def records(starts: list[int]) -> grain.DatasetIterator:
        ds = StreamRecords(order, streams=streams, num_streams=num_streams, starts=starts).map(fmt)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                                  prefetch_buffer_size=max(1, data.worker_buffer_size)))
        if data.num_workers > 0:
            mark_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers,
                                                             per_worker_buffer_size=data.worker_buffer_size))
        return iter(ds)

    ds = StreamBatcher(records, streams=streams, num_streams=num_streams,
                       rows_per_stream=config.batch_size // num_streams, mode=mode, max_length=config.max_length,
                       pad_id=model_config.eos_token_id, records_per_epoch=len(source),
                       empty_files=getattr(source, "empty_files", ()), pack=bool(data.pack),
                       pad_multiple=pad_multiple(config, model_config),
                       signature={"mode": mode, "num_streams": num_streams, "data_path": config.data_path,
                                  "records": len(source), "seed": int(config.seed), "shuffle": bool(data.shuffle),
                                  "max_length": int(config.max_length), "pack": bool(data.pack),
                                  "pad_multiple": pad_multiple(config, model_config)})
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
                        process_count: int = 1) -> "TrainIterator":
    """This process's iterator over local micro-batches: {"input_ids": int32 [B / P, max_length]} and, for
    SFT, "prompt_lengths" and "answer_lengths" int32 [B / P] (B = config.batch_size, P = process_count): rows
    [p B/P, (p+1) B/P) of every global micro-batch, whatever P is. With data.pack: "segment_ids" int32
    [B / P, max_length] and, for SFT, "prompt_mask" int32 [B / P, max_length] in place of the lengths.

    Save and restore it with `get_state()` / `set_state()` (a dict of per-stream positions; `merge_states` of
    every process's state restores under another process layout), or inside an Orbax composite with
    `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` (per-process files). Close it
    (`it.close()`, or use it as a context manager) when done; one left open is closed at exit.
    """
    batcher = iter(stream_batcher(config, model_config, process_index=process_index, process_count=process_count))
    return TrainIterator(batcher, prefetch_buffer_size=config.data.prefetch_buffer_size)


def merge_states(states: list[dict]) -> dict:
    """The iterator states of several processes as one, which any process layout restores from."""
    merged = {"streams": {}, "batches": states[0]["batches"], "signature": states[0].get("signature", {})}
    for state in states:
        merged["streams"].update(state["streams"])
    return merged


class TrainIterator(grain.DatasetIterator):
    """The iterator `make_train_iterator` returns: the batcher (read ahead by a Grain thread-prefetch iterator
    when data.prefetch_buffer_size > 0), with `stats`, a context manager and a `close()` that lets go of the
    Grain iterators so they are freed while the interpreter is intact, not during its shutdown."""

    def __init__(self, batcher: StreamBatcherIterator, *, prefetch_buffer_size: int = 0):
        super().__init__()
        self._batcher = batcher
        self._inner = grain.experimental.ThreadPrefetchDatasetIterator(batcher, prefetch_buffer_size) \
            if prefetch_buffer_size > 0 else batcher
        self._final_stats = None  # the stats when it was closed
        _OPEN_ITERATORS.add(self)

    def __next__(self) -> dict:
        self._assert_not_closed()
        return next(self._inner)

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> dict:
        """Records read, batches made and skip events so far (see `pipeline_stats`)."""
        return self._final_stats if self._closed else self._batcher.stats

    def start_prefetch(self) -> None:
        self._inner.start_prefetch()

    def get_state(self) -> dict:
        return self._inner.get_state()

    def set_state(self, state: dict) -> None:
        self._inner.set_state(state)

    def close(self) -> None:
        """Stops the prefetch thread and worker processes and drops the Grain iterators (`stats` keeps their last
        counts). Idempotent: Grain's `DatasetIterator.__del__` calls it again."""
        if self._closed:
            return
        self._final_stats = self.stats
        self._closed = True
        inner, batcher, self._inner, self._batcher = self._inner, self._batcher, None, None
        inner.close()
        batcher.close()


# Every TrainIterator still alive, held weakly: one nobody refers to any more is closed by Grain's
# DatasetIterator.__del__ when it is collected; the others are closed by close_open_iterators at exit.
_OPEN_ITERATORS: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()


@atexit.register
def close_open_iterators() -> None:
    """Closes every iterator from `make_train_iterator` (every TrainIterator) that is still open. The Grain
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
    from `make_train_iterator` (read-ahead by prefetching included), summed over its row streams."""
    if not isinstance(iterator, TrainIterator):
        raise ValueError(f"{iterator} is not a make_train_iterator iterator")
    return iterator.stats
