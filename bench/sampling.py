"""Sampler speed on a small model: generated tokens/s and NFE per method, and the sampler's own overhead.

Overhead is the sampler's time beyond its model evaluations: (t_sample - forward_calls x t_forward) /
(forward_calls x t_forward), where t_forward is one jitted forward pass of the same shape (with the same
attention-mask argument, and a batch of 2B with CFG), timed as forward_calls passes back to back. Times are the best of --reps runs after a warm-up
(compile) run, the sampler and the forward pass measured in alternation (noise on a shared machine only
adds time, and a change of load hits both alike). Not a test: run it by hand and record the figures in docs/BENCHMARKS.md.

    python bench/sampling.py [--batch 2 --prompt 32 --gen 64 --block 16 --steps 32 --d_model 256 --n_layers 4
                             --vocab 2048 --reps 5 --json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, create_sampler  # noqa: E402

CASES = [  # (method, remasking, temperature, cfg_scale)
    ("fixed_length", "low_confidence", 0.0, 0.0),
    ("semi_ar_padding", "low_confidence", 0.0, 0.0),
    ("semi_ar_origin", "low_confidence", 0.0, 0.0),
    ("semi_ar_padding", "random", 0.0, 0.0),
    ("semi_ar_padding", "low_confidence", 1.0, 0.0),
    ("semi_ar_padding", "low_confidence", 0.0, 1.0),
]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampling.json"))
    args = p.parse_args()

    config = LLaDAConfig.tiny(d_model=args.d_model, n_layers=args.n_layers, n_heads=4, n_kv_heads=4,
                              mlp_hidden_size=3 * args.d_model, vocab_size=args.vocab, max_sequence_length=1024,
                              mask_token_id=args.vocab - 1, eos_token_id=args.vocab - 2,
                              pad_token_id=args.vocab - 2, bos_token_id=args.vocab - 3)
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, length = args.batch, args.prompt + args.gen
    prompt = jax.random.randint(jax.random.key(1), (b, args.prompt), 0, args.vocab - 3, dtype=jnp.int32)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    ids = jnp.full((b, length), config.mask_token_id, jnp.int32)
    ones = jnp.ones((b, length), jnp.int32)

    def forward_fn(batch_copies, masked, calls):
        """`calls` forward passes back to back (the model work of one sample, with the same exposure to
        machine noise as the sampler's single run)."""
        x, m = jnp.tile(ids, (batch_copies, 1)), jnp.tile(ones, (batch_copies, 1)) if masked else None

        def run():
            for _ in range(calls):
                logits = forward(state, x, m)
            logits.block_until_ready()

        return run

    rows = []
    for method, remasking, temperature, cfg in CASES:
        sampler = create_sampler(method, gen_length=args.gen, block_length=args.block, steps=args.steps,
                                 remasking=remasking, temperature=temperature, cfg_scale=cfg)
        out = {}

        def run():
            out["ids"], out["stats"] = sampler(model, prompt, rng=0, return_stats=True)
            out["ids"].block_until_ready()

        run()  # compile, and learn the number of model calls
        calls = int(out["stats"].forward_calls)
        nfe = int(np.asarray(out["stats"].nfe)[0])
        model_calls = forward_fn(2 if cfg > 0 else 1, method == "semi_ar_origin", calls)
        model_calls()
        # Interleaved, so that a load change on the shared machine hits both measurements alike.
        t_sample = t_model = float("inf")
        for _ in range(args.reps):
            t_sample = min(t_sample, timed(run))
            t_model = min(t_model, timed(model_calls))
        t_fwd = t_model / calls
        model_time = t_model
        rows.append(dict(method=method, remasking=remasking, temperature=temperature, cfg_scale=cfg, nfe=nfe,
                         forward_calls=calls, seconds=t_sample, tokens_per_s=b * args.gen / t_sample,
                         forward_seconds=t_fwd, overhead=(t_sample - model_time) / model_time))

    header = f"{'method':16} {'remasking':14} {'T':>4} {'cfg':>4} {'NFE':>4} {'s/sample':>9} {'tok/s':>8} " \
             f"{'fwd ms':>7} {'overhead':>8}"
    print(f"model d_model {args.d_model}, {args.n_layers} layers, vocab {args.vocab}; batch {b}, prompt "
          f"{args.prompt}, gen {args.gen}, block {args.block}, steps {args.steps}; {jax.devices()[0].platform}")
    print(header)
    for r in rows:
        print(f"{r['method']:16} {r['remasking']:14} {r['temperature']:4.1f} {r['cfg_scale']:4.1f} {r['nfe']:4d} "
              f"{r['seconds']:9.3f} {r['tokens_per_s']:8.1f} {r['forward_seconds'] * 1e3:7.2f} "
              f"{r['overhead'] * 100:7.1f}%")
    result = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.platform(),
                  load_average=os.getloadavg(),
                  processor=platform.processor(), cpu_count=os.cpu_count(), jax=jax.__version__,
                  backend=jax.devices()[0].platform, args=vars(args), rows=rows)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
