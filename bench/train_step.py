"""Train-step throughput: tokens/s and achieved FLOP/s of the jitted step, next to the matmul peak.

The practical peak is measured in the same process: a jitted float32 (or bf16) matmul of the same order of
size as the model's. The step's FLOPs are the analytic model FLOPs (6 x matmul params + attention per token,
`llada_jax.train.step.flops_per_token`), so FLOP/s over peak is a model-FLOPs utilisation.

    python bench/train_step.py --d_model 512 1024 --json bench/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import sharding  # noqa: E402
from llada_jax.config import LLaDAConfig, train_config  # noqa: E402
from llada_jax.train.step import Trainer, flops_per_token  # noqa: E402


def model_config(d_model: int, n_layers: int, vocab: int, dtype: str) -> LLaDAConfig:
    return LLaDAConfig(d_model=d_model, n_layers=n_layers, n_heads=max(d_model // 64, 1), n_kv_heads=None,
                       mlp_hidden_size=3 * d_model, vocab_size=vocab, max_sequence_length=4096,
                       mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2,
                       bos_token_id=vocab - 3, dtype=dtype, scan_layers=True)


def matmul_peak(n: int, dtype: str, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul chain (jitted; 4 matmuls per call amortise the dispatch)."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n), dtype) / np.sqrt(n)

    @jax.jit
    def chain(x):
        for _ in range(4):
            x = x @ a
        return x

    x = chain(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x = chain(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 4 * 2 * n**3 / best


def train_step_rate(cfg: LLaDAConfig, batch: int, length: int, steps: int) -> dict:
    c = train_config(cfg)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = batch, 1, length
    c.random_length_prob, c.warmup_steps, c.max_steps = 0.0, 1, 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    trainer = Trainer(c, cfg, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    state = trainer.init_state(0)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size - 3, (1, batch, length)).astype(np.int32)
    b = jax.device_put({"input_ids": ids}, trainer.batch_sharding)
    t = time.perf_counter()
    state, m = trainer.step(state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = trainer.step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tokens = batch * length
    flops = flops_per_token(cfg, length) * tokens
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "flops_per_s": flops / step_s,
            "compile_s": compile_s}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d_model", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    rows = []
    for d in args.d_model:
        cfg = model_config(d, args.n_layers, args.vocab, args.dtype)
        peak = matmul_peak(max(d, 1024), args.dtype)
        r = train_step_rate(cfg, args.batch, args.length, args.steps)
        rows.append({"d_model": d, "n_layers": args.n_layers, "batch": args.batch, "length": args.length,
                     "dtype": args.dtype, "matmul_peak_gflops": peak / 1e9, **r,
                     "gflops_per_s": r["flops_per_s"] / 1e9, "fraction_of_peak": r["flops_per_s"] / peak})
    print(f"{'d_model':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'peak GFLOP/s':>13} {'of peak':>8} {'step s':>8}")
    for r in rows:
        print(f"{r['d_model']:>8} {r['tokens_per_s']:>10.0f} {r['gflops_per_s']:>9.1f} "
              f"{r['matmul_peak_gflops']:>13.1f} {r['fraction_of_peak']:>8.1%} {r['step_s']:>8.3f}")
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()[:1]], "rows": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
