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

With `pack` (data.pack) a row holds several documents or examples, each a segment: `segment_ids` [rows, L] numbers
them 1, 2, ... along the row (0: the EOS padding at a row's end, which belongs to none), and the model keeps each
inside its own segment (attention, positions, blocks). `concat` rows are the same tokens, each document piece a
segment; `pad` mode cuts a document into pieces of at most `max_length` (the full ones fill a row alone) and packs
the pieces; `sft` pads each example's answer with EOS to a multiple of `pad_multiple` (at least one EOS, at most to
`max_length`), packs the examples and marks their prompts (`prompt_mask` [rows, L], 1 at prompt tokens) instead of
giving prompt and answer lengths. Packing is first fit over a short lookahead, in stream order: a row takes every
unit of the stream that fits, in order, and is closed when it is full or once PACK_LOOKAHEAD units have not fit
(those stay, first in line, for the next rows; a lookahead of 1 would be next fit). The first unit waiting always
starts the next row, so the units taken out of order are a few near the front: on the benchmark's SFT length mix
(`bench/sft_packing.py`, max_length 512) 91% of the row tokens are real with a lookahead of 8, 75% with next fit.

A process reads its streams' records through one Grain pipeline (`StreamRecords`: its streams interleaved,
record k of the pipeline belonging to its stream k mod n), so parsing, tokenizing and worker processes are
shared by all its streams; each stream keeps the records it has read and not yet emitted in its own queue.

The state is, per stream, the position of the first record not fully emitted and how much of it was emitted
(tokens in concat mode, rows otherwise; packing: its units emitted before the first one waiting, plus the units
emitted ahead of that one, as (record, unit) pairs), plus the stream's skip counts. Restoring rebuilds the
pipeline so that each stream starts at that record (skipping the units emitted ahead): a state saved with one
process layout restores under any other, and a resumed run reads exactly the records the uninterrupted one would
have.
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
PACK_LOOKAHEAD = 8  # packing: a row is closed once this many units have not fit in it (see the module docstring)
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

    def __init__(self, start: int, offset: int, report: SkipReport, ahead=()):
        self.pending: collections.deque[_Entry] = collections.deque()
        self.start = start  # position of pending[0] (records before it were fully emitted)
        self.offset = offset  # units of pending[0] already emitted
        self.ahead = {tuple(unit) for unit in ahead}  # packing: (record, unit) emitted past the first one waiting
        self.report = report  # skip events of the records before `start`
        self.empty_run = 0  # records in a row that produced nothing

    def available(self) -> int:
        return sum(e.n for e in self.pending) - self.offset

    def waiting(self):
        """Packing: ((record, unit), unit, prompt length) of the units not yet emitted, in stream order."""
        offset = self.offset
        for i, entry in enumerate(self.pending):
            prompts = entry.prompt_lengths or [0] * entry.n
            for u in range(offset, entry.n):
                if (self.start + i, u) not in self.ahead:
                    yield (self.start + i, u), entry.payload[u], prompts[u]
            offset = 0

    def plan_rows(self, rows: int, length: int) -> list[list] | None:
        """The next `rows` packed rows, each a list of the `waiting` units it takes (first fit over the lookahead,
        see the module docstring), or None when the pending units run out before the last row is closed (read
        more). Emits nothing: `emit` does."""
        units, taken, plan = list(self.waiting()), set(), []
        for _ in range(rows):
            row, fill, misses = [], 0, 0
            for unit in units:
                if unit[0] in taken:
                    continue
                if fill + len(unit[1]) > length:
                    misses += 1
                    if misses == PACK_LOOKAHEAD:
                        break
                    continue
                row.append(unit)
                taken.add(unit[0])
                fill += len(unit[1])
                if fill == length:
                    break
            else:
                return None
            plan.append(row)
        return plan

    def emit(self, plan: list[list]) -> None:
        """Marks the units of `plan` emitted; retires the records whose units are all emitted."""
        self.ahead.update(unit[0] for row in plan for unit in row)
        while self.pending:
            entry = self.pending[0]
            while self.offset < entry.n and (self.start, self.offset) in self.ahead:
                self.ahead.remove((self.start, self.offset))
                self.offset += 1
            if self.offset < entry.n:
                return
            self.pending.popleft()
            self.start += 1
            self.offset = 0
            for event in entry.events:
                self.report.add(event)

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
                 records_per_epoch: int, empty_files: tuple = (), signature: dict | None = None, pack: bool = False,
                 pad_multiple: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_length <= 0 or rows_per_stream <= 0:
            raise ValueError(f"max_length and rows_per_stream must be positive, got {max_length}, {rows_per_stream}")
        self.records, self.streams, self.num_streams = records, list(streams), num_streams
        self.rows_per_stream, self.mode, self.max_length, self.pad_id = rows_per_stream, mode, max_length, pad_id
        self.records_per_epoch = records_per_epoch
        if pad_multiple <= 0:
            raise ValueError(f"pad_multiple must be positive, got {pad_multiple}")
        self.pack, self.pad_multiple = bool(pack), int(pad_multiple)
        self.empty_files = tuple(empty_files)  # files left out for holding no records (reported in stats)
        # What the saved state depends on (see StreamBatcherIterator.set_state); JSON-serialisable.
        self.signature = dict(signature or {})

    def __iter__(self) -> "StreamBatcherIterator":
        return StreamBatcherIterator(self)

    def __str__(self) -> str:
        return (f"StreamBatcher(mode={self.mode}, pack={self.pack}, max_length={self.max_length}, streams="
                f"{len(self.streams)} of {self.num_streams}, rows_per_stream={self.rows_per_stream})")


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
                rows = _pieces(unit.tokens, ds.max_length) if ds.pack else _pad_rows(unit.tokens, ds.max_length,
                                                                                      ds.pad_id)
                entry = _Entry(rows, None, len(rows), unit.events)
        elif isinstance(unit, Examples):
            if ds.mode != "sft":
                raise TypeError(f"the {ds.mode} batcher got SFT Examples")
            if ds.pack:
                rows = [_pad_example(ids, p, ds.max_length, ds.pad_multiple, ds.pad_id)
                        for ids, p in zip(unit.ids, unit.prompt_lengths)]
            else:
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
        if ds.pack and ds.mode != "concat":
            return self._next_packed()
        need = rows * L if ds.mode == "concat" else rows
        parts, segments, prompt_lengths = [], [], []
        for stream in self._streams:
            while stream.available() < need:
                self._read()
        for stream in self._streams:
            pieces, pls = stream.take(need)
            if ds.mode == "concat":
                parts.append(np.concatenate(pieces).reshape(rows, L))
                if ds.pack:  # each document piece a segment, numbered from 1 in each row
                    piece = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces]).reshape(rows, L)
                    segments.append(piece - piece[:, :1] + 1)
            else:
                parts.append(np.stack([row for piece in pieces for row in piece]))
                prompt_lengths.extend(pls)
        batch = {"input_ids": np.concatenate(parts)}
        if segments:
            batch["segment_ids"] = np.concatenate(segments)
        if ds.mode == "sft":
            lengths = np.asarray(prompt_lengths, dtype=np.int32)
            batch["prompt_lengths"] = lengths
            batch["answer_lengths"] = (L - lengths).astype(np.int32)
        self._batches += 1
        return batch

    def _next_packed(self) -> dict:
        """A batch of packed rows (pad and sft modes with `pack`; see the module docstring)."""
        ds = self._ds
        rows, L = ds.rows_per_stream, ds.max_length
        plans = []
        for stream in self._streams:
            while (plan := stream.plan_rows(rows, L)) is None:
                self._read()
            plans.append(plan)
        parts = []
        for stream, plan in zip(self._streams, plans):
            stream.emit(plan)
            parts.append(_packed_rows(plan, L, ds.pad_id, sft=ds.mode == "sft"))
        batch = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        self._batches += 1
        return batch

    # State -----------------------------------------------------------------------------------------

    def get_state(self) -> dict:
        streams = {}
        for s, stream in zip(self._ds.streams, self._streams):
            streams[str(s)] = {"record": stream.start, "offset": stream.offset, "report": stream.report.to_state(),
                               "ahead": sorted([list(unit) for unit in stream.ahead])}
        return {"streams": streams, "batches": self._batches, "signature": dict(self._ds.signature)}

    def set_state(self, state: dict) -> None:
        _check_signature(state.get("signature", {}), self._ds.signature)
        saved = state.get("streams", {})
        missing = [s for s in self._ds.streams if str(s) not in saved]
        if missing:
            raise ValueError(f"cannot restore the data iterator: the saved state has no row stream(s) "
                             f"{missing[:5]} (it has {len(saved)}: a different data.num_shards?)")
        self._reset({s: (int(saved[str(s)]["record"]), int(saved[str(s)]["offset"]),
                         SkipReport.from_state(saved[str(s)]["report"]), saved[str(s)].get("ahead", ()))
                     for s in self._ds.streams})
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


def _pieces(tokens: np.ndarray, length: int) -> list[np.ndarray]:
    """`tokens` cut into pieces of `length` (the last shorter), unpadded: a document's units when packing (copied,
    as in concat mode: tokens from a worker process live in shared memory that no reference should outlive)."""
    tokens = np.array(tokens, dtype=np.int32)
    return [tokens[start:start + length] for start in range(0, max(len(tokens), 1), length)]


def _pad_example(ids: np.ndarray, prompt_length: int, length: int, multiple: int, pad_id: int) -> np.ndarray:
    """An SFT example for packing: its answer padded with `pad_id` to the next multiple of `multiple` above its
    length (at least one pad), but never past `length` tokens in all."""
    answer = len(ids) - prompt_length
    padded = min(-(-(answer + 1) // multiple) * multiple, length - prompt_length)
    out = np.full(prompt_length + padded, pad_id, dtype=np.int32)
    out[:len(ids)] = ids
    return out


def _packed_rows(plan: list[list], length: int, pad_id: int, *, sft: bool) -> dict:
    """The arrays of packed rows (`_Stream.plan_rows`): input_ids padded with `pad_id`, segment_ids, and for SFT
    prompt_mask."""
    ids = np.full((len(plan), length), pad_id, dtype=np.int32)
    segments = np.zeros((len(plan), length), dtype=np.int32)
    prompt = np.zeros((len(plan), length), dtype=np.int32)
    for r, row in enumerate(plan):
        fill = 0
        for segment, (_, unit, prompt_length) in enumerate(row, 1):
            ids[r, fill:fill + len(unit)] = unit
            segments[r, fill:fill + len(unit)] = segment
            prompt[r, fill:fill + prompt_length] = 1
            fill += len(unit)
    batch = {"input_ids": ids, "segment_ids": segments}
    if sft:
        batch["prompt_mask"] = prompt
    return batch


def _pad_rows(tokens: np.ndarray, length: int, pad_id: int) -> list[np.ndarray]:
    """`tokens` cut into rows of `length`, the last padded with `pad_id`."""
    n_rows = max(1, -(-len(tokens) // length))
    out = np.full(n_rows * length, pad_id, dtype=np.int32)
    out[:len(tokens)] = tokens
    return list(out.reshape(n_rows, length))
