"""SFT training throughput with packed rows (data.pack) against rows padded to max_length. Not a test.

Writes a synthetic SFT set of `{"input_ids", "prompt_length"}` examples whose prompt and answer lengths are drawn
from log-normal distributions (the shape of instruction-tuning sets: many short examples and a long tail; medians
--prompt_median / --answer_median tokens, log-space sigma --sigma; examples longer than max_length are drawn
again). The same data then trains one model twice through `make_train_iterator` and `Trainer.step`, the one
configuration difference being data.pack:

- padded: one example per row, its answer EOS-padded to max_length (the LLaDA recipe);
- packed: examples packed next-fit into rows, each answer EOS-padded to a multiple of data.pad_multiple (at least
  one EOS), every example its own segment (attention, positions, loss).

Each variant's batches are read first (the pipeline's own rate is reported apart), then the steps are timed in
interleaved rounds (per round: an untimed step, then --steps timed ones of each variant), so a load change on a
shared machine hits both. Reported: the real tokens (prompt + answer, no EOS padding) and examples per second of
training, the fraction of each row that is real tokens, and the packed / padded ratios. Figures are medians over
the rounds (the JSON has every step time).

    python bench/sft_packing.py                    # max_length 512, d_model 256, 4 layers; bench/sft_packing.json
    python bench/sft_packing.py --max_length 1024 --batch_size 4
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

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llada_jax import sharding  # noqa: E402
from llada_jax.config import LLaDAConfig, sft_defaults, train_config  # noqa: E402
from llada_jax.data.pipeline import make_train_iterator  # noqa: E402
from llada_jax.train.step import Trainer, host_scalar  # noqa: E402

VARIANTS = ("padded", "packed")


def write_examples(path: str, n: int, args) -> dict:
    """n examples (token ids below the special ids); returns the length statistics of prompt + answer."""
    rng = np.random.default_rng(args.seed)
    totals = []
    with open(path, "w") as f:
        while len(totals) < n:
            prompt = max(1, int(rng.lognormal(np.log(args.prompt_median), args.sigma)))
            answer = max(1, int(rng.lognormal(np.log(args.answer_median), args.sigma)))
            if prompt + answer > args.max_length:
                continue
            ids = rng.integers(0, args.vocab - 3, size=prompt + answer)
            f.write(json.dumps({"input_ids": ids.tolist(), "prompt_length": prompt}, separators=(",", ":")) + "\n")
            totals.append(prompt + answer)
    totals = np.asarray(totals)
    return {"examples": n, "mean": float(totals.mean()), "median": float(np.median(totals)),
            "p10": float(np.percentile(totals, 10)), "p90": float(np.percentile(totals, 90)),
            "p99": float(np.percentile(totals, 99)), "max": int(totals.max())}


def model_config(args) -> LLaDAConfig:
    v = args.vocab
    return LLaDAConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=max(args.d_model // 64, 1),
                       n_kv_heads=None, mlp_hidden_size=3 * args.d_model, vocab_size=v,
                       max_sequence_length=max(args.max_length, 512), mask_token_id=v - 1, eos_token_id=v - 2,
                       pad_token_id=v - 2, bos_token_id=v - 3, dtype="float32", param_dtype="float32")


def variant_config(variant: str, data_path: str, model: LLaDAConfig, args):
    c = sft_defaults(train_config(model, task="sft"))
    c.data_path, c.max_length, c.batch_size, c.gradient_accumulation_steps = (data_path, args.max_length,
                                                                               args.batch_size, 1)
    c.learning_rate, c.warmup_steps, c.max_steps = 1e-4, 0, 1000
    c.data.index_cache_dir = os.path.join(os.path.dirname(data_path), "index_cache")
    c.data.prefetch_buffer_size = 0
    if variant == "packed":
        c.data.pack, c.data.pad_multiple = True, args.pad_multiple
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--prompt_median", type=float, default=60.0)
    p.add_argument("--answer_median", type=float, default=120.0)
    p.add_argument("--sigma", type=float, default=0.9)
    p.add_argument("--pad_multiple", type=int, default=0, help="data.pad_multiple of the packed variant")
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_packing.json"))
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="sft_packing_")
    data_path = os.path.join(tmp, "sft.jsonl")
    lengths = write_examples(data_path, args.examples, args)
    model = model_config(args)
    eos = model.eos_token_id
    needed = args.rounds * (args.steps + 1)
    runs = {}
    for variant in VARIANTS:
        c = variant_config(variant, data_path, model, args)
        it = make_train_iterator(c, model)
        t = time.perf_counter()
        batches = [next(it) for _ in range(needed)]
        read = time.perf_counter() - t
        it.close()
        trainer = Trainer(c, model, sharding.make_mesh(c.mesh, jax.devices()[:1]))
        real = [int(np.sum(b["input_ids"] != eos)) for b in batches]
        examples = [int(np.sum(np.diff(b["segment_ids"], prepend=0, axis=1) > 0)) if "segment_ids" in b
                    else args.batch_size for b in batches]
        state = trainer.init_state(0)
        compiled = time.perf_counter()
        state, metrics = trainer.step(state, jax.device_put({k: v[None] for k, v in batches[0].items()},
                                                            trainer.batch_sharding))
        host_scalar(metrics["loss"])
        runs[variant] = {"trainer": trainer, "state": state, "batches": batches, "real": real, "examples": examples,
                         "times": [], "tokens": [], "counted": [], "read_s": read,
                         "compile_s": time.perf_counter() - compiled}
    for r in range(args.rounds):
        for variant in VARIANTS:
            run = runs[variant]
            trainer = run["trainer"]
            for i in range(args.steps + 1):
                k = r * (args.steps + 1) + i
                batch = jax.device_put({key: v[None] for key, v in run["batches"][k].items()}, trainer.batch_sharding)
                t = time.perf_counter()
                run["state"], metrics = trainer.step(run["state"], batch)
                host_scalar(metrics["loss"])
                if i:  # the first step of a round is untimed (the other variant ran just before)
                    run["times"].append(time.perf_counter() - t)
                    run["tokens"].append(run["real"][k])
                    run["counted"].append(run["examples"][k])
    row_tokens = args.batch_size * args.max_length
    results = {}
    for variant in VARIANTS:
        run = runs[variant]
        per_round = np.asarray(run["times"]).reshape(args.rounds, args.steps).sum(1)
        tokens = np.asarray(run["tokens"]).reshape(args.rounds, args.steps).sum(1)
        examples = np.asarray(run["counted"]).reshape(args.rounds, args.steps).sum(1)
        results[variant] = {
            "real_tokens_per_s": float(np.median(tokens / per_round)),
            "examples_per_s": float(np.median(examples / per_round)),
            "step_s": float(np.median(run["times"])),
            "real_token_fraction": float(np.mean(run["real"]) / row_tokens),
            "examples_per_batch": float(np.mean(run["examples"])),
            "pipeline_batches_per_s": len(run["batches"]) / run["read_s"],
            "compile_s": run["compile_s"], "step_times_s": run["times"],
        }
    ratio = {key: results["packed"][key] / results["padded"][key]
             for key in ("real_tokens_per_s", "examples_per_s", "real_token_fraction")}
    out = {
        "date": datetime.date.today().isoformat(), "command": " ".join(["python", "bench/sft_packing.py"] + sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
                   f"{os.getloadavg()[0]:.1f}", "jax": jax.__version__, "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "model": {"d_model": args.d_model, "n_layers": args.n_layers, "vocab": args.vocab},
        "max_length": args.max_length, "batch_size": args.batch_size,
        "pad_multiple": args.pad_multiple or 1,
        "length_mix": {"prompt_median": args.prompt_median, "answer_median": args.answer_median,
                       "sigma": args.sigma, **lengths},
        "results": results, "packed_over_padded": ratio,
    }
    print(f"length mix: mean {lengths['mean']:.0f}, median {lengths['median']:.0f}, p90 {lengths['p90']:.0f}, "
          f"max {lengths['max']} tokens (max_length {args.max_length})")
    for variant in VARIANTS:
        r = results[variant]
        print(f"{variant:7s} {r['real_tokens_per_s']:9.0f} real tokens/s {r['examples_per_s']:7.2f} examples/s  "
              f"step {r['step_s']:.2f} s  real tokens {100 * r['real_token_fraction']:.1f}% of the rows  "
              f"{r['examples_per_batch']:.1f} examples/batch  pipeline {r['pipeline_batches_per_s']:.0f} batches/s")
    print(f"packed / padded: {ratio['real_tokens_per_s']:.2f}x real tokens/s, {ratio['examples_per_s']:.2f}x examples/s")
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
