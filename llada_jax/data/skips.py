"""What a data pipeline left out instead of stopping: skip events, counted and reported.

A bad record raises `llada_jax.errors.DataError` (naming file, line and field). With `skip_invalid` the
record is skipped instead, and a `Skip` event is counted and kept (the first few locations) in a
`SkipReport`, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses

from llada_jax.errors import DataError, describe

# Kinds of events a record can produce besides its tokens.
INVALID = "invalid"  # a malformed record, skipped because skip_invalid is on
TOO_LONG = "too_long"  # an SFT example longer than max_length, skipped by the too_long=skip policy
TRUNCATED = "truncated"  # an SFT example whose prompt was cut from the left (too_long=truncate_prompt)
EVENT_KINDS = (INVALID, TOO_LONG, TRUNCATED)


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

    @classmethod
    def combined(cls, reports, keep: int) -> "SkipReport":
        """One report of several: their counts summed, their examples in order up to `keep`."""
        out = cls(keep)
        for report in reports:
            for kind, n in report.counts.items():
                out.counts[kind] += n
            out.examples += report.examples[:keep - len(out.examples)]
        return out

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
