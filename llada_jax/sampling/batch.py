"""Batch sampling to a JSONL file: length-grouped batches, outputs in input order, safe resume.

Output line i answers input line i: {"id": ... (when the input has one), "output_ids": [gen_length ids],
"text": decoded answer or null, "nfe": model evaluations}. Records are taken in windows of the input; inside
a window they are sorted by prompt length and cut into batches (less padding), and the finished lines are
appended in input order as soon as every earlier line is done. Each write is whole lines followed by
flush + fsync; `--resume` keeps the complete lines already written (a torn last line from a crash is cut
off) and continues after them. Row keys are fold_in(key(seed), input line index), so a resumed run
writes the same lines as an uninterrupted one, whatever the batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import jax
import numpy as np

from llada_jax import sharding
from llada_jax.config import padding_token_id
from llada_jax.sampling import prompts as prompt_io

WINDOW_BATCHES = 16  # batches per sorting window


def read_done(output: str, records: list[dict]) -> int:
    """Number of complete output lines already in `output` (truncating a torn last line), checked against
    the input's ids."""
    if not os.path.exists(output):
        return 0
    with open(output, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line cut short by a crash: drop it, it is redone
        with open(output, "r+b") as f:
            f.truncate(end)
    lines = data[:end].decode("utf-8").splitlines()
    if len(lines) > len(records):
        raise ValueError(f"{output} has {len(lines)} lines but the input has only {len(records)}; "
                         f"is it the output of this input?")
    for number, line in enumerate(lines, 1):
        try:
            done = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{output} line {number}: not a complete JSON line ({e.msg}); "
                             f"cannot resume from it") from None
        if "id" in records[number - 1] and done.get("id") != records[number - 1]["id"]:
            raise ValueError(f"{output} line {number} has id {done.get('id')!r} but input line {number} has "
                             f"id {records[number - 1]['id']!r}; is it the output of this input?")
    return len(lines)


def sample_file(model, tokenizer, sampler, records: list[dict], encoded: list[list[int]], output, *,
                batch_size: int, seed: int, start: int = 0, progress: bool = True, after_write=None) -> int:
    """Sample every record from index `start` on and append the lines to `output`: a local file path, a text
    stream (standard output), or None (the other processes of a multi-process run: they sample, process 0
    writes). `after_write()` runs after every write (an upload of the file, when the output lives in object
    storage). Returns the lines done."""
    from tqdm import tqdm

    config = model.config
    gen_length = sampler.options.gen_length
    limit = config.max_sequence_length - gen_length
    base_key = jax.random.key(seed)
    pending: dict[int, str] = {}
    next_line = start
    bar = tqdm(total=len(records), initial=start, unit="prompt", desc="sampling", disable=not progress,
               dynamic_ncols=True)
    window = batch_size * WINDOW_BATCHES
    with _opened(output) as out:
        for first in range(start, len(records), window):
            indices = sorted(range(first, min(first + window, len(records))), key=lambda i: len(encoded[i]))
            for b in range(0, len(indices), batch_size):
                rows = indices[b:b + batch_size]
                seqs = [encoded[i] for i in rows]
                length = prompt_io.padded_length(max(map(len, seqs)), prompt_io.LENGTH_BUCKET, limit)
                ids, mask = prompt_io.left_pad(seqs, padding_token_id(config), length, rows=batch_size)
                keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(
                    np.array(rows + [rows[0]] * (batch_size - len(rows)), np.uint32))
                out_ids, stats = sampler(model, ids, mask, rng=keys, return_stats=True)
                generated = sharding.fetch(out_ids)[:, length:]
                nfe = sharding.fetch(stats.nfe)
                for r, i in enumerate(rows):
                    pending[i] = _line(records[i], generated[r], int(nfe[r]), tokenizer)
                lines = []
                while next_line in pending:
                    lines.append(pending.pop(next_line))
                    next_line += 1
                if lines and out is not None:
                    out.write("".join(lines))
                    out.flush()
                    if hasattr(out, "fileno") and output is not sys.stdout:
                        os.fsync(out.fileno())
                    if after_write is not None:
                        after_write()
                bar.update(len(rows))
    bar.close()
    return next_line - start


@contextlib.contextmanager
def _opened(output):
    if output is None or hasattr(output, "write"):
        yield output
        return
    with open(output, "a", encoding="utf-8") as f:
        yield f


def _line(record: dict, generated: np.ndarray, nfe: int, tokenizer) -> str:
    result = {}
    if "id" in record:
        result["id"] = record["id"]
    ids = [int(t) for t in generated]
    result["output_ids"] = ids
    result["text"] = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None
    result["nfe"] = nfe
    return json.dumps(result, ensure_ascii=False) + "\n"
