"""Batch-1 fast decoding timed as a user times it: llada_jax `generate` against Fast-dLLM's own code.

The case of `bench/official_baselines.py` (random official-layout checkpoint: d_model 256, 4 layers, 4 heads,
MLP 768, vocabulary 32,000; gen_length 128, block 32, threshold 0.9 with the dual cache, temperature 0,
low-confidence remasking), but run the way an application runs it: one prompt at a time (batch 1), prompts of
several lengths one after another, each `generate` call timed whole (from the prompt as a host array to the
answer as one), after a single warm-up call on the first prompt. No process settings of ours on either side
(no pinning, no huge pages, each framework's default threads): two plain processes, `python` for llada_jax
and --torch_python for Fast-dLLM's `generate_with_dual_cache`, loaded on the same checkpoint. The two sides
alternate, `--rounds` times each, so that a change of machine load falls on both; the tokens must be identical
(exit status 1 otherwise).

    python bench/batch1_decoding.py --fast_dllm_dir /path/to/Fast-dLLM --torch_python /path/to/venv/bin/python \\
        [--prompt_lengths 32,32,32,32,32,32] [--json bench/batch1_decoding.json]

`--no_buckets` runs llada_jax with `prompt_buckets=False` (one compiled program per prompt length, as before
buckets existed), which is what a harness with prompts of several lengths measured before.
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

VOCAB = 32000
# The harness of either side: argv[1] is a JSON payload; prints {"seconds": [per call], "tokens": [...]}.
HARNESS = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import numpy as np
prompts = [np.asarray([p], np.int64) for p in args["prompts"]]
if args["side"] == "llada_jax":
    sys.path.insert(0, args["repo"])
    from llada_jax import LLaDAForMaskedLM, generate
    model = LLaDAForMaskedLM.from_pretrained(args["hf_dir"])
    def run(prompt):
        return np.asarray(generate(model, prompt, gen_length=args["gen"], block_length=args["block"],
                                   steps=args["gen"], threshold=args["threshold"], cache="dual",
                                   prompt_buckets=args["buckets"]))
else:
    import importlib.util
    import torch
    sys.path.insert(0, args["fast_dllm_dir"] + "/llada")
    from model.modeling_llada import LLaDAModelLM
    spec = importlib.util.spec_from_file_location("fast_dllm_generate", args["fast_dllm_dir"] + "/llada/generate.py")
    fast = importlib.util.module_from_spec(spec); spec.loader.exec_module(fast)
    model = LLaDAModelLM.from_pretrained(args["hf_dir"], torch_dtype=torch.float32).eval()
    def run(prompt):
        with torch.no_grad():
            return fast.generate_with_dual_cache(
                model, torch.tensor(prompt), steps=args["gen"], gen_length=args["gen"], block_length=args["block"],
                temperature=0.0, remasking="low_confidence", mask_id=args["mask_id"],
                threshold=args["threshold"])[0].numpy()
run(prompts[0])  # one warm-up call
seconds, tokens = [], []
for prompt in prompts:
    t = time.perf_counter()
    out = run(prompt)
    seconds.append(time.perf_counter() - t)
    tokens.append(out[0, prompt.shape[1]:].tolist())
print(json.dumps({"seconds": seconds, "tokens": tokens}))
"""


def side(python: str, payload: dict) -> dict:
    proc = subprocess.run([python, "-c", HARNESS, json.dumps(payload)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {payload['side']} side failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast_dllm_dir", required=True, help="a checkout of github.com/NVlabs/Fast-dLLM")
    p.add_argument("--torch_python", required=True, help="Python with torch and transformers 4.x")
    p.add_argument("--prompt_lengths", default="32,32,32,32,32,32",
                   help="comma-separated lengths of the prompts, run in this order (the first is also the warm-up)")
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
    p.add_argument("--no_buckets", action="store_true", help="llada_jax with prompt_buckets=False")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "batch1_decoding.json"))
    args = p.parse_args()

    import numpy as np
    from flax import nnx

    from llada_jax import LLaDAConfig, LLaDAForMaskedLM

    config = LLaDAConfig.tiny(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768,
                              vocab_size=VOCAB, max_sequence_length=1024, mask_token_id=VOCAB - 1,
                              eos_token_id=VOCAB - 2, pad_token_id=VOCAB - 2, bos_token_id=VOCAB - 3)
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB - 3, n).tolist() for n in lengths]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        LLaDAForMaskedLM(config, rngs=nnx.Rngs(0)).save_pretrained(hf_dir)
        payload = dict(hf_dir=hf_dir, repo=repo, fast_dllm_dir=args.fast_dllm_dir, prompts=prompts, gen=args.gen,
                       block=args.block, threshold=args.threshold, mask_id=config.mask_token_id,
                       buckets=not args.no_buckets)
        for r in range(args.rounds):
            ours = side(sys.executable, dict(payload, side="llada_jax"))
            theirs = side(args.torch_python, dict(payload, side="fast_dllm"))
            same = ours["tokens"] == theirs["tokens"]
            tokens = len(prompts) * args.gen
            row = {"round": r, "llada_jax_seconds": ours["seconds"], "fast_dllm_seconds": theirs["seconds"],
                   "llada_jax_tokens_per_s": tokens / sum(ours["seconds"]),
                   "fast_dllm_tokens_per_s": tokens / sum(theirs["seconds"]), "identical_tokens": same}
            row["speedup"] = row["llada_jax_tokens_per_s"] / row["fast_dllm_tokens_per_s"]
            rounds.append(row)
            print(f"round {r}: llada_jax {row['llada_jax_tokens_per_s']:6.1f} tokens/s "
                  f"(calls {', '.join(f'{s:.3f}' for s in ours['seconds'])} s), Fast-dLLM "
                  f"{row['fast_dllm_tokens_per_s']:6.1f} tokens/s (calls "
                  f"{', '.join(f'{s:.3f}' for s in theirs['seconds'])} s): {row['speedup']:.2f}x, "
                  f"identical tokens: {same}", flush=True)
    speedups = sorted(r["speedup"] for r in rounds)
    result = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "settings": vars(args),
              "prompt_lengths": lengths, "rounds": rounds, "median_speedup": speedups[len(speedups) // 2]}
    print(f"median speed-up over {len(rounds)} rounds: {result['median_speedup']:.2f}x "
          f"(load average {', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    if not all(r["identical_tokens"] for r in rounds):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
