"""Prompt records of the `sample` command: reading JSONL, encoding, and left-padded batches.

One JSON object per line, with exactly one of
    {"input_ids": [token ids]}            used as they are
    {"prompt": "text"}                    tokenized (the tokenizer adds its special tokens, e.g. BOS)
    {"messages": [{"role", "content"}]}   rendered with the chat template plus the assistant prompt
and optionally an "id" (copied to the output). Every error names the file and the line.
"""

from __future__ import annotations

import contextlib
import json
import sys

import numpy as np

from llada_jax.checkpoints import storage

PROMPT_FIELDS = ("input_ids", "prompt", "messages")
LENGTH_BUCKET = 16  # prompts are left-padded to a multiple of this (fewer distinct shapes to compile)


def json_object(text: str, where: str) -> dict:
    """One JSONL line as a dict; `where` ("file line N") prefixes the error when it is not a JSON object."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def parse_record(text: str, where: str) -> dict:
    """Validate one JSONL line; `where` ("file line N") prefixes every error."""
    record = json_object(text, where)
    present = [f for f in PROMPT_FIELDS if f in record]
    if len(present) != 1:
        raise ValueError(f"{where}: expected exactly one of {list(PROMPT_FIELDS)}, got "
                         f"{present or sorted(record)}")
    field = present[0]
    value = record[field]
    if field == "input_ids":
        if not isinstance(value, list) or not value or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
            raise ValueError(f"{where}: 'input_ids' must be a non-empty list of non-negative integers")
    elif field == "prompt":
        if not isinstance(value, str):
            raise ValueError(f"{where}: 'prompt' must be a string")
    else:
        if not isinstance(value, list) or not value or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    return record


def read_records(path: str) -> list[dict]:
    """All records of a JSONL file, or of standard input for "-" (blank lines are errors too: output lines
    pair with input lines)."""
    records = []
    name = "<stdin>" if path == "-" else path
    with (contextlib.nullcontext(sys.stdin) if path == "-" else storage.open_file(path)) as f:
        for number, line in enumerate(f, 1):
            records.append(parse_record(line, f"{name} line {number}"))
    if not records:
        raise ValueError(f"{name}: no prompts")
    return records


def needs_tokenizer(record: dict) -> bool:
    return "input_ids" not in record


def encode(record: dict, tokenizer) -> list[int]:
    if "input_ids" in record:
        return list(record["input_ids"])
    if "prompt" in record:
        return tokenizer.encode(record["prompt"], add_special_tokens=True)  # a raw prompt: BOS as the tokenizer adds it
    return tokenizer.apply_chat_template(record["messages"])


def padded_length(length: int, bucket: int, limit: int) -> int:
    """`length` rounded up to a multiple of `bucket` (fewer distinct shapes, fewer compiles), at most `limit`."""
    return min(-(-length // bucket) * bucket, limit) if bucket > 1 else length


def left_pad(sequences: list[list[int]], pad_id: int, length: int, rows: int | None = None):
    """(ids, attention_mask) int32 [rows, length]: each sequence right-aligned; extra rows are all padding
    with one real token (the first sequence's last), so every row has something to attend to."""
    rows = rows or len(sequences)
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r in range(rows):
        seq = sequences[r] if r < len(sequences) else sequences[0][-1:]
        ids[r, length - len(seq):] = seq
        mask[r, length - len(seq):] = 1
    return ids, mask
