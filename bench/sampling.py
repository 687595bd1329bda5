"""Sampler speed on a small model: generated tokens/s and NFE per method, the sampler's own overhead, and the
speed-up over a PyTorch implementation of the official per-step sampler on the same weights.

Overhead is the sampler's time beyond its model evaluations: (t_sample - forward_calls x t_forward) /
(forward_calls x t_forward), where t_forward is one jitted forward pass of the same shape (with the same
attention-mask argument, and a batch of 2B with CFG), timed as forward_calls passes back to back. Times are the best of --reps runs after a warm-up
(compile) run, the sampler and the forward pass measured in alternation (noise on a shared machine only
adds time, and a change of load hits both alike). Not a test: run it by hand and record the figures in docs/BENCHMARKS.md.

PyTorch baseline (unless --no_torch): the JAX model is exported with `save_pretrained` (llada_jax.checkpoints) and
loaded by the project's PyTorch modeling file; `bench/torch_baseline.official_generate` runs the official
algorithm as ML-GSAI/LLaDA's generate.py does (a Python loop over blocks and steps, one model call per step,
float64 softmax confidence, per-row torch.topk), at temperature 0 with low-confidence remasking, for the
cases that algorithm covers (fixed_length, semi_ar_padding, and CFG). The output tokens must be identical to
the JAX sampler's (the script exits with status 1 otherwise); the ratio is JAX tokens/s over PyTorch tokens/s,
both best of --reps runs, measured in alternation. Both frameworks run with the same threads (see
bench/process_setup.py).

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
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.process_setup import setup_process  # noqa: E402

THREADS = setup_process(sys.argv[1:], __file__) if __name__ == "__main__" else len(os.sched_getaffinity(0))

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
    p.add_argument("--threads", type=int, default=0, help="CPUs for both frameworks (0: all schedulable)")
    p.add_argument("--no_hugepages", action="store_true", help="see bench/process_setup.py")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
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

    torch_rows = [] if args.no_torch else compare_with_torch(args, model, prompt)

    header = f"{'method':16} {'remasking':14} {'T':>4} {'cfg':>4} {'NFE':>4} {'s/sample':>9} {'tok/s':>8} " \
             f"{'fwd ms':>7} {'overhead':>8}"
    print(f"model d_model {args.d_model}, {args.n_layers} layers, vocab {args.vocab}; batch {b}, prompt "
          f"{args.prompt}, gen {args.gen}, block {args.block}, steps {args.steps}; {jax.devices()[0].platform}")
    print(header)
    for r in rows:
        print(f"{r['method']:16} {r['remasking']:14} {r['temperature']:4.1f} {r['cfg_scale']:4.1f} {r['nfe']:4d} "
              f"{r['seconds']:9.3f} {r['tokens_per_s']:8.1f} {r['forward_seconds'] * 1e3:7.2f} "
              f"{r['overhead'] * 100:7.1f}%")
    if torch_rows:
        print(f"\nvs PyTorch, official per-step algorithm (T = 0, low_confidence), same weights, {THREADS} threads:")
        print(f"{'method':16} {'cfg':>4} {'NFE':>4} {'JAX tok/s':>10} {'torch tok/s':>12} {'JAX/torch':>10} "
              f"{'same tokens':>12}")
        for r in torch_rows:
            print(f"{r['method']:16} {r['cfg_scale']:4.1f} {r['nfe']:4d} {r['jax_tokens_per_s']:10.1f} "
                  f"{r['torch_tokens_per_s']:12.1f} {r['speedup']:9.2f}x {str(r['identical']):>12}")
    result = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.platform(),
                  load_average=os.getloadavg(), threads=THREADS,
                  glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                  processor=platform.processor(), cpu_count=os.cpu_count(), jax=jax.__version__,
                  backend=jax.devices()[0].platform, args=vars(args), rows=rows, torch_rows=torch_rows)
    if torch_rows:
        import torch

        result.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    if not all(r["identical"] for r in torch_rows):
        print("FAILED: the JAX and PyTorch samplers produced different tokens", file=sys.stderr)
        return 1
    return 0


TORCH_CASES = [  # (method, cfg_scale): the cases the official generate.py covers at temperature 0
    ("fixed_length", 0.0),
    ("semi_ar_padding", 0.0),
    ("semi_ar_padding", 1.0),
]


def compare_with_torch(args, model, prompt) -> list[dict]:
    """JAX sampler vs the official per-step algorithm in PyTorch on the exported weights (see module doc)."""
    import torch

    from bench.torch_baseline import official_generate
    from llada_jax.checkpoints.hf_files.modeling_llada import LLaDAModelLM

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "hf"))  # llada_jax.checkpoints: official layout + modeling files
        torch_model = LLaDAModelLM.from_pretrained(os.path.join(tmp, "hf"), dtype=torch.float32).eval()
    torch_prompt = torch.from_numpy(np.asarray(prompt).astype(np.int64))
    b, mask_id = prompt.shape[0], model.config.mask_token_id
    rows = []
    for method, cfg in TORCH_CASES:
        block = args.gen if method == "fixed_length" else args.block
        sampler = create_sampler(method, gen_length=args.gen, block_length=args.block, steps=args.steps,
                                 remasking="low_confidence", temperature=0.0, cfg_scale=cfg)
        out = {}

        def run_jax():
            out["jax"], out["stats"] = sampler(model, prompt, rng=0, return_stats=True)
            out["jax"].block_until_ready()

        def run_torch():
            out["torch"], out["calls"] = official_generate(torch_model, torch_prompt, steps=args.steps,
                                                           gen_length=args.gen, block_length=block,
                                                           mask_id=mask_id, cfg_scale=cfg)

        run_jax()
        run_torch()
        t_jax = t_torch = float("inf")
        for _ in range(args.reps):
            t_jax = min(t_jax, timed(run_jax))
            t_torch = min(t_torch, timed(run_torch))
        ours, theirs = np.asarray(out["jax"]), out["torch"].numpy()
        nfe = int(np.asarray(out["stats"].nfe)[0])
        rows.append(dict(method=method, block_length=block, cfg_scale=cfg, nfe=nfe,
                         torch_nfe=out["calls"] * (2 if cfg > 0 else 1), identical=bool(np.array_equal(ours, theirs)),
                         differing_tokens=int(np.sum(ours != theirs)), jax_seconds=t_jax, torch_seconds=t_torch,
                         jax_tokens_per_s=b * args.gen / t_jax, torch_tokens_per_s=b * args.gen / t_torch,
                         speedup=t_torch / t_jax))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
