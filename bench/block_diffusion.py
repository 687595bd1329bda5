"""Block diffusion against the bidirectional sampler: generated tokens/s of `block_diffusion` (exact prefix KV cache,
one block of the model's block_size per step) on a block-causal model, and of `semi_ar_padding` (every step a full
pass) on a bidirectional model of the same size, at the same gen_length and one token per step; and the training
cost of the doubled (x_t ++ x_0) sequence of the block-diffusion objective against the LLaDA objective.

Random weights (the tokens are not the point; the work per step is). A row stops after the block holding EOS, so
the EOS id is set past the tokens a random model picks here, and the script checks that every block ran (NFE).
Times are the best of --reps runs after a compile run, the two samplers measured in alternation. Not a test: run
it by hand and record the figures in docs/BENCHMARKS.md.

    python bench/block_diffusion.py [--batch 4 --prompt 32 --gen 128 --block 32 --block_sizes 4,8,16,32
                                     --d_model 256 --n_layers 4 --vocab 2048 --reps 5]
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

from bench.process_setup import setup_process  # noqa: E402

THREADS = setup_process(sys.argv[1:], __file__) if __name__ == "__main__" else len(os.sched_getaffinity(0))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, create_sampler  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_model(args, **fields) -> LLaDAForMaskedLM:
    config = LLaDAConfig.tiny(d_model=args.d_model, n_layers=args.n_layers, n_heads=4, n_kv_heads=4,
                              mlp_hidden_size=3 * args.d_model, vocab_size=args.vocab, max_sequence_length=1024,
                              mask_token_id=args.vocab - 1, eos_token_id=args.vocab - 2,
                              pad_token_id=args.vocab - 2, bos_token_id=args.vocab - 3, **fields)
    return LLaDAForMaskedLM(config, rngs=nnx.Rngs(0))


def sampler_run(model, sampler, prompt):
    out = {}

    def run():
        out["ids"], out["stats"] = sampler(model, prompt, rng=0, return_stats=True)
        out["ids"].block_until_ready()

    run()  # compile
    return run, out


def training_cost(args) -> list[dict]:
    """Seconds per train step (forward + backward, one micro-batch) of the LLaDA objective on a bidirectional
    model and of the block-diffusion objective (2L positions) on a block-causal one."""
    from llada_jax import sharding
    from llada_jax.config import model_config_from, train_config
    from llada_jax.train.step import Trainer

    rows = []
    for name, fields in (("bidirectional, LLaDA objective", {}),
                         (f"block_causal (blocks of {args.train_block}), BD3-LM objective",
                          dict(attention_type="block_causal", block_size=args.train_block))):
        c = train_config(make_model(args, **fields).config)
        c.batch_size, c.gradient_accumulation_steps, c.max_length = args.train_batch, 1, args.train_length
        c.random_length_prob, c.warmup_steps = 0.0, 0
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
        trainer = Trainer(c, model_config_from(c), sharding.make_mesh(c.mesh, jax.devices()[:1]))
        state = trainer.init_state(0)
        batch = {"input_ids": jax.random.randint(jax.random.key(2), (1, args.train_batch, args.train_length), 0,
                                                 args.vocab - 3, dtype=jnp.int32)}
        state, metrics = trainer.step(state, batch)  # compile
        jax.block_until_ready(metrics["loss"])
        best = float("inf")
        for _ in range(args.reps):
            t = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            jax.block_until_ready(metrics["loss"])
            best = min(best, time.perf_counter() - t)
        rows.append(dict(objective=name, seconds_per_step=best))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--block", type=int, default=32, help="the bidirectional sampler's block_length")
    p.add_argument("--block_sizes", default="4,8,16,32", help="block sizes of the block-causal models")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--train_length", type=int, default=256)
    p.add_argument("--train_block", type=int, default=8)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_diffusion.json"))
    p.add_argument("--threads", type=int, default=0, help="CPUs (0: all schedulable)")
    p.add_argument("--no_hugepages", action="store_true", help="see bench/process_setup.py")
    args = p.parse_args()

    prompt = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 0, args.vocab - 3, dtype=jnp.int32)
    base_model = make_model(args)
    base = create_sampler("semi_ar_padding", gen_length=args.gen, block_length=args.block, steps=args.gen)
    base_run, base_out = sampler_run(base_model, base, prompt)
    rows = []
    for size in map(int, args.block_sizes.split(",")):
        model = make_model(args, attention_type="block_causal", block_size=size)
        sampler = create_sampler("block_diffusion", gen_length=args.gen, steps=args.gen)
        run, out = sampler_run(model, sampler, prompt)
        nfe = np.asarray(out["stats"].nfe)
        if not (nfe == args.gen).all():
            print(f"block size {size}: a row stopped early (NFE {nfe.tolist()}): EOS was sampled", file=sys.stderr)
            return 1
        t_base = t_block = float("inf")
        for _ in range(args.reps):  # in alternation
            t_base = min(t_base, timed(base_run))
            t_block = min(t_block, timed(run))
        tokens = args.batch * args.gen
        rows.append(dict(block_size=size, block_tokens_per_s=tokens / t_block, base_tokens_per_s=tokens / t_base,
                         ratio=t_base / t_block, block_seconds=t_block, base_seconds=t_base,
                         block_forward_calls=int(out["stats"].forward_calls),
                         base_forward_calls=int(base_out["stats"].forward_calls)))
    train_rows = training_cost(args)

    print(f"model d_model {args.d_model}, {args.n_layers} layers, vocab {args.vocab}; batch {args.batch}, prompt "
          f"{args.prompt}, gen {args.gen}, one token per step; semi_ar_padding block_length {args.block}; "
          f"{jax.devices()[0].platform}, {THREADS} threads")
    print(f"{'block size':>10} {'block_diffusion tok/s':>22} {'semi_ar_padding tok/s':>22} {'ratio':>6} "
          f"{'calls':>6}")
    for r in rows:
        print(f"{r['block_size']:>10} {r['block_tokens_per_s']:>22.1f} {r['base_tokens_per_s']:>22.1f} "
              f"{r['ratio']:>6.2f} {r['block_forward_calls']:>6}")
    print(f"train step, batch {args.train_batch} x {args.train_length}:")
    for r in train_rows:
        print(f"  {r['objective']}: {r['seconds_per_step'] * 1000:.1f} ms")
    if len(train_rows) == 2:
        ratio = train_rows[1]["seconds_per_step"] / train_rows[0]["seconds_per_step"]
        print(f"  block-diffusion / LLaDA objective: {ratio:.2f}x")
    record = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.machine(),
                  processor=platform.processor(), threads=THREADS, args=vars(args), sampling=rows,
                  training=train_rows)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
