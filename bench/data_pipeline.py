"""Throughput of the pretraining input pipeline (tokens/s) on pre-tokenized JSONL. Not a test.

Writes a synthetic corpus of `{"input_ids": [...]}` documents (LLaDA-8B vocabulary, lengths uniform in
[--min_len, --max_len]), then runs `make_train_iterator` (concat mode, shuffled, LLaDA-8B special ids) for
each worker count and counts the tokens of the batches it delivers in --seconds after the first batch
(worker start-up excluded). Prints a table and writes JSON (default bench/data_pipeline.json, next to this
script, committed with the figures quoted in docs/BENCHMARKS.md).

    PYTHONPATH=$PWD python bench/data_pipeline.py --workers 0,1,2 --seconds 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np


def write_corpus(path: str, docs: int, min_len: int, max_len: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    tokens = 0
    with open(path, "w") as f:
        for _ in range(docs):
            n = int(rng.integers(min_len, max_len + 1))
            ids = rng.integers(0, 126000, size=n)  # below the special ids (mask 126336, EOS 126081, BOS 126080)
            f.write(json.dumps({"input_ids": ids.tolist()}, separators=(",", ":")) + "\n")
            tokens += n
    return tokens


def measure(data_path: str, workers: int, seconds: float, args) -> dict:
    from llada_jax.config import LLaDAConfig, train_config
    from llada_jax.data.pipeline import make_train_iterator

    model = LLaDAConfig.llada_8b()
    c = train_config(model)
    c.data_path, c.max_length, c.batch_size, c.seed = data_path, args.max_length, args.batch_size, 0
    c.data.num_workers = workers
    c.data.read_threads = args.read_threads
    c.data.prefetch_buffer_size = args.prefetch
    c.data.index_cache_dir = os.path.join(os.path.dirname(data_path), "index_cache")
    t0 = time.perf_counter()
    it = make_train_iterator(c, model)
    next(it)
    startup = time.perf_counter() - t0
    batches, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        batches += 1
    elapsed = time.perf_counter() - t0
    it.close()
    tokens = batches * args.batch_size * args.max_length
    per = tokens / elapsed
    return {"workers": workers, "batches": batches, "tokens": tokens, "seconds": round(elapsed, 3),
            "tokens_per_s": round(per), "tokens_per_s_per_worker": round(per / max(workers, 1)),
            "startup_s": round(startup, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker-process counts")
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per setting")
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--min_len", type=int, default=100)
    p.add_argument("--max_len", type=int, default=3000)
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--read_threads", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=2, help="data.prefetch_buffer_size (batches)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_pipeline.json"),
                   help="where the results go (default: bench/data_pipeline.json)")
    args = p.parse_args(argv)

    from llada_jax.data.pipeline import mark_absl_flags_parsed

    mark_absl_flags_parsed()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "corpus.jsonl")
        t0 = time.perf_counter()
        corpus_tokens = write_corpus(data_path, args.docs, args.min_len, args.max_len)
        print(f"corpus: {args.docs:,} documents, {corpus_tokens:,} tokens, "
              f"{os.path.getsize(data_path) / 2**20:.0f} MiB ({time.perf_counter() - t0:.1f} s to write)")
        results = [measure(data_path, int(w), args.seconds, args) for w in args.workers.split(",")]

    print(f"\n{'workers':>7} {'tokens/s':>12} {'per worker':>12} {'batches':>8} {'start-up s':>10}")
    for r in results:
        print(f"{r['workers']:>7} {r['tokens_per_s']:>12,} {r['tokens_per_s_per_worker']:>12,} {r['batches']:>8} "
              f"{r['startup_s']:>10}")
    import grain

    record = {
        "benchmark": "data_pipeline", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "bench/data_pipeline.py"] + list(argv or sys.argv[1:])),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "grain": grain.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "corpus_tokens": corpus_tokens, "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp_out, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
