"""Rows and batches from row streams, with an exact state that any process layout can restore.

The global micro-batch of B rows is made of S independent **row streams** (S = data.num_shards; by default
one per row, S = B), each contributing B / S consecutive rows. Stream s reads the records at positions
s, s + S, s + 2S, ... of the record order (every record once per epoch, reshuffled each epoch), so what a
stream reads, and therefore every global batch, is a function of (data, seed, S) alone. A process runs the
streams of its rows: with P processes, process p runs streams [p S/P, (p+1) S/P), whose rows are its slice of
the global batch. Nothing depends on P.

Within a stream, the units of its records (`formats.Document` / `Examples` / `Skipped`) become rows:

- `concat` (pretraining, the original recipe): the stream's documents (each ending with EOS) form one token
  stream, cut into rows of `max_length`;
- `pad` (pretraining): one document per row, padded with EOS; a longer document continues on the stream's next
  rows (nothing is dropped), the last of them padded;
- `sft`: one example per row, padded with EOS to `max_length`; the padding belongs to the answer, so
  `answer_lengths = max_length - prompt_lengths`.

A process reads its streams' records through one Grain pipeline (`StreamRecords`: its streams interleaved,
record k of the pipeline belonging to its stream k mod n), so parsing, tokenizing and worker processes are
shared by all its streams; each stream keeps the records it has read and not yet emitted in its own queue.

The state is, per stream, the position of the first record not fully emitted and how much of it was emitted
(tokens in concat mode, rows otherwise), plus the stream's skip counts. Restoring rebuilds the pipeline so that
each stream starts at that record: a state saved with one process layout restores under any other, and a
resumed run reads exactly the records the uninterrupted one would have.
"""

from __future__ import annotations

import collections
import logging
import sys
from typing import Callable

import grain
import numpy as np

from llada_jax.data.formats import Document, Examples, Skipped
from llada_jax.data.skips import SkipReport
from llada_jax.errors import DataError

log = logging.getLogger(__name__)

MODES = ("concat", "pad", "sft")
REPORT_KEEP = 20  # skip events logged per process, and kept (the first ones) in stats
STREAM_KEEP = 3  # skip events kept per stream in its state (the counts are all kept)


class StreamRecords(grain.MapDataset):
    """The records of some row streams, interleaved: element k is record `starts[k % n] + k // n` of stream
    `streams[k % n]`, i.e. element `stream + num_streams * position` of `order` (the record order of all
    streams). Infinite, like `order`."""

    def __init__(self, order: grain.MapDataset, *, streams: list[int], num_streams: int, starts: list[int]):
        super().__init__(order)
        if len(streams) != len(starts) or not streams:
            raise ValueError("StreamRecords needs one start position per stream")
        self._streams, self._num_streams, self._starts = list(streams), num_streams, list(starts)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._streams)
        j = index % n
        return self._parent[self._streams[j] + self._num_streams * (self._starts[j] + index // n)]

    def __str__(self) -> str:
        return f"StreamRecords(streams={self._streams[0]}..{self._streams[-1]} of {self._num_streams})"


class _Entry:
    """A record read by a stream: its units (tokens or rows), how many, their prompt lengths, its skip events."""

    __slots__ = ("payload", "prompt_lengths", "n", "events")

    def __init__(self, payload, prompt_lengths, n, events):
        self.payload, self.prompt_lengths, self.n, self.events = payload, prompt_lengths, n, events


class _Stream:
    """One row stream: the records read and not yet fully emitted, and its position."""

    def __init__(self, start: int, offset: int, report: SkipReport):
        self.pending: collections.deque[_Entry] = collections.deque()
        self.start = start  # position of pending[0] (records before it were fully emitted)
        self.offset = offset  # units of pending[0] already emitted
        self.report = report  # skip events of the records before `start`
        self.empty_run = 0  # records in a row that produced nothing

    def available(self) -> int:
        return sum(e.n for e in self.pending) - self.offset

    def take(self, count: int) -> tuple[list, list]:
        """The next `count` units (tokens or rows) with their prompt lengths; retires finished records."""
        pieces, prompt_lengths = [], []
        got = 0
        while got < count:
            entry = self.pending[0]
            take = min(entry.n - self.offset, count - got)
            if take:
                pieces.append(entry.payload[self.offset:self.offset + take])
                if entry.prompt_lengths is not None:
                    prompt_lengths.extend(entry.prompt_lengths[self.offset:self.offset + take])
                got += take
                self.offset += take
            if self.offset == entry.n:
                self.pending.popleft()
                self.start += 1
                self.offset = 0
                for event in entry.events:
                    self.report.add(event)
        return pieces, prompt_lengths


class StreamBatcher(grain.IterDataset):
    """This process's part of every global micro-batch: `rows_per_stream` rows from each of `streams`, in
    stream order (see the module docstring).

    `records(starts)` builds the Grain iterator of units (parsed records) that `StreamRecords` orders, each
    stream starting at its position in `starts`; the batcher rebuilds it when its state is restored.
    `records_per_epoch`: how many records the data has; that many units in a row without a single token is an
    error (every record was skipped), never an endless loop.
    """

    def __init__(self, records: Callable[[list[int]], grain.DatasetIterator], *, streams: list[int],
                 num_streams: int, rows_per_stream: int, mode: str, max_length: int, pad_id: int,
                 records_per_epoch: int, empty_files: tuple = (), signature: dict | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_length <= 0 or rows_per_stream <= 0:
            raise ValueError(f"max_length and rows_per_stream must be positive, got {max_length}, {rows_per_stream}")
        self.records, self.streams, self.num_streams = records, list(streams), num_streams
        self.rows_per_stream, self.mode, self.max_length, self.pad_id = rows_per_stream, mode, max_length, pad_id
        self.records_per_epoch = records_per_epoch
        self.empty_files = tuple(empty_files)  # files left out for holding no records (reported in stats)
        # What the saved state depends on (see StreamBatcherIterator.set_state); JSON-serialisable.
        self.signature = dict(signature or {})

    def __iter__(self) -> "StreamBatcherIterator":
        return StreamBatcherIterator(self)

    def __str__(self) -> str:
        return (f"StreamBatcher(mode={self.mode}, max_length={self.max_length}, streams={len(self.streams)} of "
                f"{self.num_streams}, rows_per_stream={self.rows_per_stream})")


class StreamBatcherIterator(grain.DatasetIterator):
    def __init__(self, ds: StreamBatcher):
        super().__init__()
        self._ds = ds
        self._records: grain.DatasetIterator | None = None
        self._batches = 0
        self._empty_run = 0
        self._logged = 0
        self._reset({s: (0, 0, SkipReport(STREAM_KEEP)) for s in ds.streams})

    def _reset(self, positions: dict) -> None:
        """Start every stream at (record position, units emitted of it, skip report); rebuild the reader."""
        if self._records is not None:
            self._records.close()
        self._streams = [_Stream(*positions[s]) for s in self._ds.streams]
        self._records = self._ds.records([positions[s][0] for s in self._ds.streams])
        self._read_count = 0  # units read by this reader: unit k belongs to stream k mod n

    # Reading ---------------------------------------------------------------------------------------

    def _read(self) -> None:
        unit = next(self._records)
        stream = self._streams[self._read_count % len(self._streams)]
        self._read_count += 1
        ds = self._ds
        if isinstance(unit, Skipped):
            entry = _Entry(None, None, 0, unit.events)
        elif isinstance(unit, Document):
            if ds.mode == "sft":
                raise TypeError("the sft batcher got a pretraining Document")
            if ds.mode == "concat":
                # A plain copy: from a worker process the tokens arrive in shared memory, released as soon as
                # nothing refers to them (a reference kept past interpreter shutdown would leak the segment).
                tokens = np.array(unit.tokens)
                entry = _Entry(tokens, None, len(tokens), unit.events)
            else:
                rows = _pad_rows(unit.tokens, ds.max_length, ds.pad_id)
                entry = _Entry(rows, None, len(rows), unit.events)
        elif isinstance(unit, Examples):
            if ds.mode != "sft":
                raise TypeError(f"the {ds.mode} batcher got SFT Examples")
            rows = [_pad_rows(ids, ds.max_length, ds.pad_id)[0] for ids in unit.ids]
            entry = _Entry(rows, list(unit.prompt_lengths), len(rows), unit.events)
        else:
            raise TypeError(f"unexpected element {type(unit).__name__} in the data pipeline")
        for event in entry.events:
            if self._logged < REPORT_KEEP:
                log.warning("data: %s", event)
                self._logged += 1
                if self._logged == REPORT_KEEP:
                    log.warning("data: further skips are counted (iterator.stats), not logged")
        # Nothing but skipped records for a whole epoch's worth of reads, in the process or in one stream (whose
        # records can be all bad when the order is not shuffled): an error, never an endless loop.
        stream.empty_run = stream.empty_run + 1 if entry.n == 0 else 0
        self._empty_run = self._empty_run + 1 if entry.n == 0 else 0
        if max(stream.empty_run, self._empty_run) > ds.records_per_epoch:
            reasons = "; ".join(str(e) for e in entry.events) or "no tokens"
            raise DataError("data", "", f"{max(stream.empty_run, self._empty_run)} records in a row produced "
                                        f"nothing (every record of a whole pass was skipped); the last: {reasons}")
        stream.pending.append(entry)

    def __next__(self) -> dict:
        self._assert_not_closed()
        ds = self._ds
        rows, L = ds.rows_per_stream, ds.max_length
        need = rows * L if ds.mode == "concat" else rows
        parts, prompt_lengths = [], []
        for stream in self._streams:
            while stream.available() < need:
                self._read()
        for stream in self._streams:
            pieces, pls = stream.take(need)
            if ds.mode == "concat":
                parts.append(np.concatenate(pieces).reshape(rows, L))
            else:
                parts.append(np.stack([row for piece in pieces for row in piece]))
                prompt_lengths.extend(pls)
        batch = {"input_ids": np.concatenate(parts)}
        if ds.mode == "sft":
            lengths = np.asarray(prompt_lengths, dtype=np.int32)
            batch["prompt_lengths"] = lengths
            batch["answer_lengths"] = (L - lengths).astype(np.int32)
        self._batches += 1
        return batch

    # State -----------------------------------------------------------------------------------------

    def get_state(self) -> dict:
        streams = {}
        for s, stream in zip(self._ds.streams, self._streams):
            streams[str(s)] = {"record": stream.start, "offset": stream.offset, "report": stream.report.to_state()}
        return {"streams": streams, "batches": self._batches, "signature": dict(self._ds.signature)}

    def set_state(self, state: dict) -> None:
        _check_signature(state.get("signature", {}), self._ds.signature)
        saved = state.get("streams", {})
        missing = [s for s in self._ds.streams if str(s) not in saved]
        if missing:
            raise ValueError(f"cannot restore the data iterator: the saved state has no row stream(s) "
                             f"{missing[:5]} (it has {len(saved)}: a different data.num_shards?)")
        self._reset({s: (int(saved[str(s)]["record"]), int(saved[str(s)]["offset"]),
                         SkipReport.from_state(saved[str(s)]["report"])) for s in self._ds.streams})
        self._batches = int(state["batches"])
        self._empty_run = 0

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self._records is not None:
            self._records.close()
            self._records = None

    @property
    def stats(self) -> dict:
        """Records read, batches produced, skip events (counts and the first locations) and empty files so far."""
        records, pending_events = 0, []
        for stream in self._streams:
            pending = list(stream.pending)  # one atomic copy: a prefetch thread may be appending
            records += stream.start + len(pending)
            pending_events += [e for entry in pending for e in entry.events]
        report = SkipReport.combined([s.report for s in self._streams], REPORT_KEEP).merged(pending_events)
        return {"records": records, "batches": self._batches, "skipped": dict(report.counts),
                "skip_examples": list(report.examples), "empty_files": list(self._ds.empty_files)}

    def __str__(self) -> str:
        return f"StreamBatcherIterator({self._ds})"


# A state from a pipeline that differs in these cannot be restored (its positions refer to other records);
# differences in the others are legal but change the stream, so they are logged.
STRUCTURAL = ("mode", "num_streams")


def _check_signature(saved: dict, current: dict) -> None:
    diffs = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
             if k in saved and k in current and saved[k] != current[k]}
    hard = {k: v for k, v in diffs.items() if k in STRUCTURAL}
    if hard:
        raise ValueError("cannot restore the data iterator: it was saved by a pipeline with "
                         + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in hard.items()))
    if diffs:
        log.warning("data: restoring an iterator saved with %s; the stream will not continue the saved one exactly",
                    ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diffs.items()))


def _pad_rows(tokens: np.ndarray, length: int, pad_id: int) -> list[np.ndarray]:
    """`tokens` cut into rows of `length`, the last padded with `pad_id`."""
    n_rows = max(1, -(-len(tokens) // length))
    out = np.full(n_rows * length, pad_id, dtype=np.int32)
    out[:len(tokens)] = tokens
    return list(out.reshape(n_rows, length))
