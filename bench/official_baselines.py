"""The samplers against the official code itself: ML-GSAI/LLaDA's `generate.py` and Fast-dLLM's
`generate_with_dual_cache`, on the same random official-layout checkpoint, same prompts, identical tokens.

Neither upstream repository is part of this project: give their checkouts by path (they are imported from
there, in a separate process, never copied):

    python bench/official_baselines.py --llada_dir /path/to/LLaDA --fast_dllm_dir /path/to/Fast-dLLM \\
        --torch_python /path/to/venv/bin/python [--json bench/official_baselines.json]

`--torch_python` is a Python with torch and transformers 4.x (the official modeling code does not run under
transformers 5); the model class is the modeling code shipped with Fast-dLLM (`llada/model/modeling_llada.py`,
the official LLaDA modeling code with its KV-cache additions; its plain forward is the official one), loaded on
the checkpoint this script exports with `save_pretrained`.

Cases (defaults, the issue's): d_model 256, 4 layers, 4 heads, MLP 768, vocabulary 32,000, batch 4, 32-token
prompts, gen_length 128, block 32, 128 steps, temperature 0, low-confidence remasking: the official `generate`
vs `llada_jax.generate`; and at batch 1 threshold 0.9 with the dual cache: Fast-dLLM's
`generate_with_dual_cache` vs `generate(..., threshold=0.9, cache="dual")`. Each side: a warm-up call
(compilation), then the best of --reps calls, the two sides in alternation; both use the same number of CPU
threads. The tokens must be identical (exit status 1 otherwise). Also printed: one plain step's time against
its matmul-bound time (its matmul FLOPs over the measured float32 matmul rate of this machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
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

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, generate  # noqa: E402

# The PyTorch side, run by --torch_python: imports the upstream code from the given checkouts.
TORCH_SIDE = r"""
import json, sys, time
import numpy as np
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
sys.path.insert(0, args["fast_dllm_dir"] + "/llada")
from model.modeling_llada import LLaDAModelLM
model = LLaDAModelLM.from_pretrained(args["hf_dir"], torch_dtype=torch.float32).eval()
if args["case"] == "plain":
    sys.path.insert(0, args["llada_dir"])
    from generate import generate as official
    def run():
        return official(model, prompt, steps=args["steps"], gen_length=args["gen"], block_length=args["block"],
                        temperature=0.0, remasking="low_confidence", mask_id=args["mask_id"])
else:
    import importlib.util
    spec = importlib.util.spec_from_file_location("fast_dllm_generate", args["fast_dllm_dir"] + "/llada/generate.py")
    fast = importlib.util.module_from_spec(spec); spec.loader.exec_module(fast)
    def run():
        return fast.generate_with_dual_cache(model, prompt, steps=args["steps"], gen_length=args["gen"],
                                             block_length=args["block"], temperature=0.0,
                                             remasking="low_confidence", mask_id=args["mask_id"],
                                             threshold=args["threshold"])[0]
prompt = torch.tensor(args["prompts"], dtype=torch.long)
with torch.no_grad():
    out = run()  # warm-up
    best = float("inf")
    for _ in range(args["reps"]):
        t = time.perf_counter(); out = run(); best = min(best, time.perf_counter() - t)
print(json.dumps({"seconds": best, "tokens": out.tolist()}))
"""


def torch_side(args, case: str, hf_dir: str, prompts: np.ndarray, mask_id: int) -> dict:
    payload = dict(case=case, hf_dir=hf_dir, llada_dir=args.llada_dir, fast_dllm_dir=args.fast_dllm_dir,
                   prompts=prompts.tolist(), steps=args.steps if case == "plain" else args.gen, gen=args.gen,
                   block=args.block, mask_id=mask_id, threshold=args.threshold, reps=args.reps, threads=THREADS)
    proc = subprocess.run([args.torch_python, "-c", TORCH_SIDE, json.dumps(payload)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the PyTorch side failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def matmul_rate() -> float:
    """float32 FLOP/s of a chain of 1024^3 matmuls (this machine's matmul-bound rate)."""
    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x: x @ a @ a @ a @ a)
    seconds = best_of(lambda: f(a), 5)
    return 4 * 2 * 1024**3 / seconds


def plain_step_flops(c: LLaDAConfig, batch: int, length: int, block: int) -> float:
    """Matmul FLOPs of one plain step: every block over every position, the output head over the block."""
    hd, n, k = c.head_dim, c.n_heads, c.effective_n_kv_heads
    per_layer = c.d_model * (n + 2 * k) * hd + n * hd * c.d_model + 3 * c.d_model * c.mlp_hidden_size
    attention = 2 * n * hd * length  # scores and weighted sum, per position and layer
    return 2.0 * batch * (length * c.n_layers * (per_layer + attention) + block * c.d_model * c.padded_vocab_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llada_dir", required=True, help="a checkout of github.com/ML-GSAI/LLaDA (generate.py)")
    p.add_argument("--fast_dllm_dir", required=True, help="a checkout of github.com/NVlabs/Fast-dLLM")
    p.add_argument("--torch_python", default=sys.executable, help="Python with torch and transformers 4.x")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "official_baselines.json"))
    args = p.parse_args()
    vocab = args.vocab
    config = LLaDAConfig.tiny(d_model=args.d_model, n_layers=args.n_layers, n_heads=4, n_kv_heads=4,
                              mlp_hidden_size=3 * args.d_model, vocab_size=vocab, max_sequence_length=1024,
                              mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2,
                              bos_token_id=vocab - 3)
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, vocab - 3, (args.batch, args.prompt)).astype(np.int64)
    results = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": platform.machine(),
               "threads": THREADS, "settings": vars(args), "cases": []}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        model.save_pretrained(hf_dir)
        for case in ("plain", "threshold_dual_cache"):
            rows = prompts if case == "plain" else prompts[:1]
            if case == "plain":
                def ours():
                    return generate(model, rows, gen_length=args.gen, block_length=args.block, steps=args.steps)
            else:
                def ours():
                    return generate(model, rows, gen_length=args.gen, block_length=args.block, steps=args.gen,
                                    threshold=args.threshold, cache="dual")
            jax_seconds = best_of(ours, args.reps)
            theirs = torch_side(args, case, hf_dir, rows, config.mask_token_id)
            same = np.array_equal(np.asarray(ours()), np.asarray(theirs["tokens"]))
            failed |= not same
            tokens = rows.shape[0] * args.gen
            row = {"case": case, "baseline": "official generate.py" if case == "plain" else
                   "Fast-dLLM generate_with_dual_cache", "batch": int(rows.shape[0]),
                   "jax_tokens_per_s": tokens / jax_seconds, "baseline_tokens_per_s": tokens / theirs["seconds"],
                   "speedup": theirs["seconds"] / jax_seconds, "identical_tokens": bool(same)}
            results["cases"].append(row)
            print(f"{case:24s} batch {row['batch']}: llada_jax {row['jax_tokens_per_s']:7.1f} tokens/s, "
                  f"{row['baseline']} {row['baseline_tokens_per_s']:7.1f} tokens/s = {row['speedup']:.2f}x, "
                  f"identical tokens: {same}")
    # one plain step against its matmul-bound time
    ids = jnp.concatenate([jnp.asarray(prompts, jnp.int32), jnp.full((args.batch, args.gen), vocab - 1, jnp.int32)], 1)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, x: nnx.merge(graphdef, s).logits(
        nnx.merge(graphdef, s).hidden_states(x)[:, args.prompt:args.prompt + args.block]))
    step_seconds = best_of(lambda: step(state, ids), 5)
    flops = plain_step_flops(config, args.batch, ids.shape[1], args.block)
    rate = matmul_rate()
    results["step"] = {"network_seconds": step_seconds, "matmul_flops": flops, "matmul_rate": rate,
                       "matmul_bound_seconds": flops / rate, "ratio": step_seconds / (flops / rate)}
    plain = results["cases"][0]
    steps_per_s = plain["jax_tokens_per_s"] / args.batch * args.steps / args.gen
    results["step"]["sampler_step_seconds"] = 1 / steps_per_s
    print(f"plain step: sampler {1e3 / steps_per_s:.1f} ms, network alone {1e3 * step_seconds:.1f} ms, "
          f"matmul-bound {1e3 * flops / rate:.1f} ms ({flops / 1e9:.2f} GFLOP at {rate / 1e9:.0f} GFLOP/s): "
          f"{(1 / steps_per_s) / (flops / rate):.2f}x the matmul-bound time")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
