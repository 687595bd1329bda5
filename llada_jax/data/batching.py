"""Rows and batches from parsed records, as a Grain `IterDataset` whose state restores exactly.

`RowBatcher` reads `Document` / `Examples` / `Skipped` units (the output of `formats`) and emits batches:

- `concat` (pretraining, the original recipe): documents (each ending with EOS) form one token stream, cut
  into rows of `max_length`; a batch is the next `batch_size * max_length` tokens of the stream.
- `pad` (pretraining): one document per row, padded with EOS; a document longer than `max_length` continues
  on the next rows (nothing is dropped), the last of them padded.
- `sft`: one example per row, padded with EOS to `max_length`; the padding belongs to the answer, so
  `answer_lengths = max_length - prompt_lengths`.

The state is exact and small: the parent's state before the first record not fully emitted yet, how much of
that record was emitted (tokens in concat mode, rows otherwise), and the counts of records and skip events
already passed. Restoring it re-reads that record and continues on the same token, whatever the record's
size. Skip events (invalid records, too-long or truncated examples) are counted when the stream passes them,
logged (the first few) and available as `iterator.stats`.
"""

from __future__ import annotations

import collections
import copy
import logging

import grain
import numpy as np

from llada_jax.data.formats import Document, Examples, Skipped
from llada_jax.data.skips import SkipReport
from llada_jax.errors import DataError

log = logging.getLogger(__name__)

MODES = ("concat", "pad", "sft")


class RowBatcher(grain.IterDataset):
    """Batches of `batch_size` rows of `max_length` tokens (see the module docstring).

    `records_per_epoch`: the number of records the parent yields per pass; a run of that many records
    without a single token is an error (every record was skipped), never an endless loop.
    """

    def __init__(self, parent: grain.IterDataset, *, mode: str, max_length: int, batch_size: int, pad_id: int,
                 records_per_epoch: int, report_keep: int = 20, empty_files: tuple = (), signature: dict | None = None):
        super().__init__(parent)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_length <= 0 or batch_size <= 0:
            raise ValueError(f"max_length and batch_size must be positive, got {max_length}, {batch_size}")
        self.mode, self.max_length, self.batch_size, self.pad_id = mode, max_length, batch_size, pad_id
        self.records_per_epoch, self.report_keep = records_per_epoch, report_keep
        self.empty_files = tuple(empty_files)  # files left out for holding no records (reported in stats)
        # What the saved state depends on (see RowBatcherIterator.set_state); JSON-serialisable.
        self.signature = dict(signature or {})

    def __iter__(self) -> "RowBatcherIterator":
        return RowBatcherIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"RowBatcher(mode={self.mode}, max_length={self.max_length}, batch_size={self.batch_size})"


class _Entry:
    """A record read from the parent: its parent state before it, its payload, how many units it holds."""

    __slots__ = ("state", "payload", "prompt_lengths", "n", "events")

    def __init__(self, state, payload, prompt_lengths, n, events):
        self.state, self.payload, self.prompt_lengths, self.n, self.events = state, payload, prompt_lengths, n, events


class RowBatcherIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: RowBatcher):
        super().__init__(parent)
        self._ds = ds
        self._pending: collections.deque[_Entry] = collections.deque()
        self._offset = 0  # units of pending[0] already emitted
        self._records = 0  # records fully passed
        self._report = SkipReport(ds.report_keep)  # events of records fully passed
        self._batches = 0
        self._empty_run = 0
        self._logged = 0

    # Reading ---------------------------------------------------------------------------------------

    def _read(self) -> None:
        state = self._parent.get_state()
        unit = next(self._parent)
        ds = self._ds
        if isinstance(unit, Skipped):
            entry = _Entry(state, None, None, 0, unit.events)
        elif isinstance(unit, Document):
            if ds.mode == "sft":
                raise TypeError("the sft batcher got a pretraining Document")
            if ds.mode == "concat":
                # A plain copy: from a worker process the tokens arrive in shared memory, released as soon as
                # nothing refers to them (a reference kept past interpreter shutdown would leak the segment).
                tokens = np.array(unit.tokens)
                entry = _Entry(state, tokens, None, len(tokens), unit.events)
            else:
                rows = _pad_rows(unit.tokens, ds.max_length, ds.pad_id)
                entry = _Entry(state, rows, None, len(rows), unit.events)
        elif isinstance(unit, Examples):
            if ds.mode != "sft":
                raise TypeError(f"the {ds.mode} batcher got SFT Examples")
            rows = [_pad_rows(ids, ds.max_length, ds.pad_id)[0] for ids in unit.ids]
            entry = _Entry(state, rows, list(unit.prompt_lengths), len(rows), unit.events)
        else:
            raise TypeError(f"unexpected element {type(unit).__name__} in the data pipeline")
        for event in entry.events:
            if self._logged < ds.report_keep:
                log.warning("data: %s", event)
                self._logged += 1
                if self._logged == ds.report_keep:
                    log.warning("data: further skips are counted (iterator.stats), not logged")
        if entry.n == 0:
            self._empty_run += 1
            if self._empty_run > ds.records_per_epoch:
                reasons = "; ".join(str(e) for e in entry.events) or "no tokens"
                raise DataError("data", "", f"{self._empty_run} records in a row produced nothing (every record "
                                            f"of a whole pass was skipped); the last: {reasons}")
        else:
            self._empty_run = 0
        self._pending.append(entry)

    def _take(self, count: int) -> tuple[list, list]:
        """The next `count` units (tokens or rows) with their prompt lengths; retires finished records."""
        pieces, pls = [], []
        got, i, off = 0, 0, self._offset
        pending = self._pending
        while got < count:
            if i == len(pending):
                self._read()
            e = pending[i]
            take = min(e.n - off, count - got)
            if take:
                pieces.append(e.payload[off:off + take])
                if e.prompt_lengths is not None:
                    pls.extend(e.prompt_lengths[off:off + take])
                got += take
                off += take
            if off == e.n:
                i, off = i + 1, 0
        for _ in range(i):
            done = pending.popleft()
            self._records += 1
            for event in done.events:
                self._report.add(event)
        self._offset = off
        return pieces, pls

    def __next__(self) -> dict:
        self._assert_not_closed()
        ds = self._ds
        B, L = ds.batch_size, ds.max_length
        if ds.mode == "concat":
            pieces, _ = self._take(B * L)
            batch = {"input_ids": np.concatenate(pieces).reshape(B, L)}
        else:
            pieces, pls = self._take(B)
            rows = [row for piece in pieces for row in piece]
            batch = {"input_ids": np.stack(rows)}
            if ds.mode == "sft":
                prompt_lengths = np.asarray(pls, dtype=np.int32)
                batch["prompt_lengths"] = prompt_lengths
                batch["answer_lengths"] = (L - prompt_lengths).astype(np.int32)
        self._batches += 1
        return batch

    # State -----------------------------------------------------------------------------------------

    def get_state(self) -> dict:
        parent = self._pending[0].state if self._pending else self._parent.get_state()
        return {"parent": copy.deepcopy(parent), "offset": self._offset, "records": self._records,
                "batches": self._batches, "report": self._report.to_state(), "signature": dict(self._ds.signature)}

    def set_state(self, state: dict) -> None:
        _check_signature(state.get("signature", {}), self._ds.signature)
        self._parent.set_state(state["parent"])
        self._pending.clear()
        self._offset = int(state["offset"])
        self._records = int(state["records"])
        self._batches = int(state["batches"])
        self._report = SkipReport.from_state(state["report"])
        self._empty_run = 0

    @property
    def stats(self) -> dict:
        """Records read, batches produced, skip events (counts and the first locations) and empty files so far."""
        pending = list(self._pending)  # one atomic copy: a prefetch thread may be appending
        report = self._report.merged(e for entry in pending for e in entry.events)
        return {"records": self._records + len(pending), "batches": self._batches,
                "skipped": dict(report.counts), "skip_examples": list(report.examples),
                "empty_files": list(self._ds.empty_files)}

    def __str__(self) -> str:
        return f"RowBatcherIterator({self._ds})"


# A state from a pipeline that differs in these cannot be restored (its parent state has another shape or
# refers to other records); differences in the others are legal but change the stream, so they are logged.
STRUCTURAL = ("mode", "num_workers", "shard", "num_shards")


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
