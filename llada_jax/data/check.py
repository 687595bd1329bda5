"""`data check`: validate every record of training files and summarise them.

`check_files` parses each record with the pipeline's own formats (`formats.PretrainFormat` /
`formats.SftFormat`), so a file that passes is a file the pipeline accepts. It keeps going after a bad record:
problems are counted and the first `max_problems` are kept with their file, line and field. It reports
records, examples (SFT: one per assistant turn), tokens and length percentiles. Files and the tokenizer
directory may be URLs (gs://...): files are streamed, the tokenizer is downloaded once (`storage.local_copy`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llada_jax.checkpoints import storage
from llada_jax.checkpoints.storage import StorageError
from llada_jax.data.formats import (
    Document,
    Examples,
    PretrainFormat,
    SftFormat,
    Skipped,
)
from llada_jax.data.sources import iter_records, resolve_paths
from llada_jax.errors import DataError, describe
from llada_jax.tokenizer import load_tokenizer

KINDS = ("pretrain", "sft")


@dataclasses.dataclass
class CheckReport:
    kind: str
    files: list
    vocab_size: int | None
    mask_token_id: int | None
    max_length: int | None = None
    records: int = 0
    examples: int = 0
    tokens: int = 0
    lengths: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)
    problem_count: int = 0
    max_problems: int = 20

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(text)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def percentiles(self) -> dict:
        if not self.lengths:
            return {}
        a = np.asarray(self.lengths)
        out = {"min": int(a.min())}
        out.update({f"p{q}": int(np.percentile(a, q, method="nearest")) for q in (50, 90, 99)})
        out.update({"max": int(a.max()), "mean": float(a.mean())})
        return out

    @property
    def too_long(self) -> int:
        return 0 if self.max_length is None else int(sum(n > self.max_length for n in self.lengths))

    def lines(self) -> list[str]:
        unit = "documents" if self.kind == "pretrain" else "examples"
        out = [f"checked {len(self.files)} file(s) as {self.kind} data: {self.records:,} records, "
               f"{self.examples:,} {unit}, {self.tokens:,} tokens"]
        p = self.percentiles()
        if p:
            out.append(f"{unit[:-1]} length: min {p['min']}, p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, "
                       f"max {p['max']}, mean {p['mean']:.1f}")
        checks = f"vocabulary {self.vocab_size}" if self.vocab_size else "vocabulary unchecked (no --vocab_size)"
        checks += f", mask token {self.mask_token_id}" if self.mask_token_id is not None else ", mask token unchecked"
        out.append(f"checked: {checks}")
        if self.max_length is not None:
            out.append(f"{self.too_long:,} {unit} longer than max_length {self.max_length}")
        if self.ok:
            out.append("OK: no problems")
        else:
            shown = len(self.problems)
            out.append(f"{self.problem_count} problem(s)" + (f" (the first {shown} shown)" if shown < self.problem_count
                                                              else "") + ":")
            out.extend(f"  {p}" for p in self.problems)
        return out


def check_files(paths, *, kind: str, tokenizer=None, vocab_size: int | None = None, mask_token_id: int | None = None,
                max_length: int | None = None, max_problems: int = 20) -> CheckReport:
    """Validate every record of `paths` (files, globs, directories) as `kind` ("pretrain" | "sft") data.

    The vocabulary size and mask id come from the arguments or else from the tokenizer (a directory or a
    URL). A file that does not exist, cannot be read (a storage error, named) or holds no records is a
    problem like a bad record.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    helper = load_tokenizer(storage.local_copy(tokenizer) if isinstance(tokenizer, str) and tokenizer else tokenizer)
    vocab = vocab_size or (len(helper) if helper is not None else None)
    mask = mask_token_id if mask_token_id is not None else (helper.mask_token_id if helper is not None else None)
    ids = dict(vocab_size=vocab, mask_token_id=mask, tokenizer=helper, skip_invalid=True,
               eos_token_id=None, bos_token_id=helper.bos_token_id if helper is not None else None)
    fmt = PretrainFormat(**ids) if kind == "pretrain" else SftFormat(**ids)

    files = []
    report = CheckReport(kind, files, vocab, mask, max_length=max_length, max_problems=max_problems)
    for item in paths:
        try:
            files.extend(resolve_paths([item]))
        except (FileNotFoundError, ValueError, StorageError) as e:
            report.problem(str(e))
    for path in files:
        try:
            for rec in iter_records(path):
                report.records += 1
                unit = fmt(rec)
                if isinstance(unit, Skipped):
                    for event in unit.events:
                        report.problem(describe(event.where, event.field, event.message))
                elif isinstance(unit, Document):
                    report.examples += 1
                    report.tokens += unit.source_length
                    report.lengths.append(unit.source_length)
                elif isinstance(unit, Examples):
                    for row in unit.ids:
                        report.examples += 1
                        report.tokens += len(row)
                        report.lengths.append(len(row))
        except (DataError, StorageError) as e:  # file-level: missing, unreadable, empty, a malformed JSON array
            report.problem(str(e))
    return report
