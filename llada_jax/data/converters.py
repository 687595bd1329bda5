"""`DatasetConverter`: ShareGPT, Alpaca and OpenAI-style chats -> pre-tokenized SFT JSONL.

Each output line is `{"input_ids": [...], "prompt_length": N}`: the prompt (chat template over the earlier
turns, with the generation prompt) followed by the answer (content + `<|eot_id|>`), one line per assistant
turn, unpadded (the pipeline pads with EOS to its max_length). The tokenization is exactly the pipeline's
(`formats.SftFormat`), so converting first and training on the output gives the same examples as training
on the chats. Inputs are JSONL or one JSON array (Alpaca's `alpaca_data.json`). The input, the output and
the tokenizer directory may be URLs (gs://...). The output is written with `atomic.atomic_file`: a temporary
file next to it renamed into place when complete, or for a URL a local temporary uploaded as one object when
complete; on an error nothing is left behind (and an existing output is untouched).
"""

from __future__ import annotations

import dataclasses
import json

from llada_jax.checkpoints import storage
from llada_jax.checkpoints.atomic import atomic_file
from llada_jax.data.formats import Examples, SftFormat, Skipped
from llada_jax.data.skips import SkipReport
from llada_jax.data.sources import iter_records
from llada_jax.tokenizer import TokenizerHelper, load_tokenizer

FORMATS = ("sharegpt", "alpaca", "openai")


@dataclasses.dataclass
class ConvertReport:
    input_path: str
    output_path: str
    records: int = 0
    examples: int = 0
    tokens: int = 0
    skipped: SkipReport = dataclasses.field(default_factory=SkipReport)

    def summary(self) -> str:
        return (f"{self.input_path}: {self.records} records -> {self.examples} examples, {self.tokens:,} tokens "
                f"written to {self.output_path} ({self.skipped.summary()})")


class DatasetConverter:
    """Convert chat datasets to LLaDA's pre-tokenized SFT format with one tokenizer.

    `max_length` (optional) applies the `too_long` policy (error | skip | truncate_prompt) at conversion
    time; `skip_invalid` skips bad records (counted in the report) instead of stopping at the first.
    """

    def __init__(self, tokenizer: "TokenizerHelper | str", *, max_length: int | None = None, too_long: str = "error",
                 skip_invalid: bool = False, vocab_size: int | None = None):
        if isinstance(tokenizer, str) and tokenizer:
            tokenizer = storage.local_copy(tokenizer)  # a URL is downloaded once (AutoTokenizer reads local files)
        self.tokenizer = load_tokenizer(tokenizer)
        if self.tokenizer is None:
            raise ValueError("DatasetConverter needs a tokenizer")
        self.max_length, self.too_long, self.skip_invalid = max_length, too_long, skip_invalid
        self.vocab_size = vocab_size or len(self.tokenizer)

    def _format(self, layout: str) -> SftFormat:
        t = self.tokenizer
        return SftFormat(max_length=self.max_length, too_long=self.too_long, expect=layout,
                         vocab_size=self.vocab_size, mask_token_id=t.mask_token_id, eos_token_id=t.eos_token_id,
                         bos_token_id=t.bos_token_id, tokenizer=t, skip_invalid=self.skip_invalid)

    def convert(self, fmt: str, input_path: str, output_path: str) -> ConvertReport:
        """Convert `input_path` (layout `fmt`) to `output_path`, written only when every record converted.

        A missing input is a `FileNotFoundError` naming it; a bad record a `DataError` (unless skip_invalid);
        a storage failure (an output bucket that does not exist or cannot be written: checked first) a
        `StorageError` naming the URL.
        """
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if not storage.is_file(input_path):
            what = "no such object (or no such bucket)" if storage.is_url(input_path) else "no such file"
            raise FileNotFoundError(f"{input_path}: {what}")
        if storage.is_url(output_path):  # a missing bucket or no permission: said now, not after the work
            storage.check_writable(storage.clean(output_path).rsplit("/", 1)[0])
        parse = self._format(fmt)
        report = ConvertReport(input_path, output_path)
        with atomic_file(output_path, "w") as out:
            for rec in iter_records(input_path):
                report.records += 1
                unit = parse(rec)
                for event in unit.events:
                    report.skipped.add(event)
                if isinstance(unit, Skipped):
                    continue
                assert isinstance(unit, Examples)
                for ids, pl in zip(unit.ids, unit.prompt_lengths):
                    out.write(json.dumps({"input_ids": ids.tolist(), "prompt_length": int(pl)},
                                         separators=(",", ":")) + "\n")
                    report.examples += 1
                    report.tokens += len(ids)
        return report

    def convert_sharegpt_to_llada(self, input_path: str, output_path: str) -> ConvertReport:
        """`{"conversations": [{"from", "value"}, ...]}` records -> `{"input_ids", "prompt_length"}` lines."""
        return self.convert("sharegpt", input_path, output_path)

    def convert_alpaca_to_llada(self, input_path: str, output_path: str) -> ConvertReport:
        """`{"instruction", "input", "output"}` records (JSON array or JSONL) -> `{"input_ids", "prompt_length"}`."""
        return self.convert("alpaca", input_path, output_path)

    def convert_openai_to_llada(self, input_path: str, output_path: str) -> ConvertReport:
        """`{"messages": [{"role", "content"}, ...]}` records -> `{"input_ids", "prompt_length"}` lines."""
        return self.convert("openai", input_path, output_path)
