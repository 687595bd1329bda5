"""Bad input: the error every data problem raises, and the record of what was skipped instead.

A `DataError` names where the problem is (file and line, or a TFDS split and record index) and the field
(`input_ids`, `conversations[2].from`, ...). By default any bad record stops the run with one; with
`skip_invalid` the record is skipped and a `Skip` event is counted and kept (the first few locations) in a
`SkipReport`, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses

# Kinds of events a record can produce besides its tokens.
INVALID = "invalid"  # a malformed record, skipped because skip_invalid is on
TOO_LONG = "too_long"  # an SFT example longer than max_length, skipped by the too_long=skip policy
TRUNCATED = "truncated"  # an SFT example whose prompt was cut from the left (too_long=truncate_prompt)
EVENT_KINDS = (INVALID, TOO_LONG, TRUNCATED)


class DataError(ValueError):
    """A bad record or file. `where` is "path, line N" (or "tfds:NAME:SPLIT, record N"); `field` may be ''."""

    def __init__(self, where: str, field: str, message: str):
        self.where, self.field, self.message = where, field, message
        super().__init__(describe(where, field, message))

    def __reduce__(self):  # exceptions cross process boundaries (Grain workers) by pickling
        return (DataError, (self.where, self.field, self.message))


class TokenizerRequired(ValueError):
    """Records that need a tokenizer (text, chats) and none configured: a set-up problem, never skipped."""


def describe(where: str, field: str, message: str) -> str:
    return f"{where}: field '{field}': {message}" if field else f"{where}: {message}"


@dataclasses.dataclass(frozen=True)
class Skip:
    """One record or example left out (or changed) instead of stopping: what, where and why."""

    kind: str  # one of EVENT_KINDS
    where: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {describe(self.where, self.field, self.message)}"

    @classmethod
    def from_error(cls, kind: str, error: DataError) -> "Skip":
        return cls(kind, error.where, error.field, error.message)


class SkipReport:
    """Counts of skip events by kind plus the first `keep` of them, for logs and the iterator's state."""

    def __init__(self, keep: int = 20):
        self.keep = keep
        self.counts = {kind: 0 for kind in EVENT_KINDS}
        self.examples: list[str] = []

    def add(self, event: Skip) -> None:
        self.counts[event.kind] += 1
        if len(self.examples) < self.keep:
            self.examples.append(str(event))

    def merged(self, events) -> "SkipReport":
        out = SkipReport.from_state(self.to_state())
        for event in events:
            out.add(event)
        return out

    def to_state(self) -> dict:
        return {"keep": self.keep, "counts": dict(self.counts), "examples": list(self.examples)}

    @classmethod
    def from_state(cls, state: dict) -> "SkipReport":
        out = cls(state["keep"])
        out.counts.update({k: int(v) for k, v in state["counts"].items()})
        out.examples = list(state["examples"])
        return out

    def summary(self) -> str:
        parts = [f"{n} {kind}" for kind, n in self.counts.items() if n]
        return ", ".join(parts) if parts else "nothing skipped"
