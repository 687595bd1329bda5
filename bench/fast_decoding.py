"""Fast decoding on a trained model: train a small LLaDA on a synthetic task, then compare samplers.

The task ("cipher copy"): the prompt is BOS, N random symbols, SEP; the answer is the same symbols mapped
through a fixed secret permutation of the alphabet, then EOS (padding the answer to gen_length); with
`--task reverse` the symbols are taken in reverse order, which a small model learns much more slowly (after a
few minutes it is right on most tokens but not all: a harder test of what a fast sampler loses). Exact-match
accuracy against the one right answer measures what each sampler gets right.

1. Training: llada_jax's own SFT train step (`llada_jax.train.step.Trainer`: the SFT objective, AdamW,
   warmup + cosine) on freshly drawn batches for `--train_seconds` (or `--train_steps`). The trained model is
   saved with `save_model` (`--save DIR`) and can be reused with `--load DIR`.
2. Evaluation: `llada_jax.eval.analysis.compare_sampling_methods` on `--examples` held-out prompts (other seed):
   accuracy (exact match), NFE and generated tokens/s of each sampler setting, compile time excluded, each
   setting timed `--repeats` times (the best time is kept, the accuracy is that of the first run).

    PYTHONPATH=. python bench/fast_decoding.py --train_seconds 300 --save /tmp/fast_model --out bench/fast_decoding.json
    PYTHONPATH=. python bench/fast_decoding.py --load /tmp/fast_model --out bench/fast_decoding.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

ALPHABET = 32  # symbols are ids 0 .. 31
SEP = 60


def model_config(args):
    from llada_jax import LLaDAConfig

    return LLaDAConfig.tiny(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                            mlp_hidden_size=3 * args.d_model, vocab_size=64, max_sequence_length=256,
                            mask_token_id=63, eos_token_id=62, pad_token_id=62, bos_token_id=61)


def make_examples(rng: np.random.RandomState, count: int, n: int, permutation: np.ndarray, bos: int,
                  task: str = "copy"):
    """(prompts [count, n + 2], answers [count, n]) of the cipher-copy (or cipher-reverse) task."""
    symbols = rng.randint(0, ALPHABET, (count, n))
    prompts = np.concatenate([np.full((count, 1), bos), symbols, np.full((count, 1), SEP)], axis=1)
    answers = permutation[symbols if task == "copy" else symbols[:, ::-1]]
    return prompts.astype(np.int32), answers.astype(np.int32)


def train(args, config, permutation):
    import jax

    from llada_jax import sharding
    from llada_jax.config import train_config
    from llada_jax.train.step import Trainer

    c = train_config(config, task="sft")
    c.batch_size, c.gradient_accumulation_steps = args.train_batch, 1
    c.max_length = args.n + 2 + args.gen_length
    c.learning_rate, c.warmup_steps, c.max_steps = args.lr, 100, args.train_steps
    c.random_length_prob = 0.0
    c.optimizer.weight_decay = 0.01
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    trainer = Trainer(c, config, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    state = trainer.init_state(args.seed)
    rng = np.random.RandomState(args.seed)
    plen = args.n + 2
    start, step, log = time.perf_counter(), 0, []
    while step < args.train_steps and time.perf_counter() - start < args.train_seconds:
        prompts, answers = make_examples(rng, args.train_batch, args.n, permutation, config.bos_token_id, args.task)
        pad = np.full((args.train_batch, args.gen_length - args.n), config.eos_token_id, np.int32)
        batch = {"input_ids": np.concatenate([prompts, answers, pad], axis=1)[None],
                 "prompt_lengths": np.full((1, args.train_batch), plen, np.int32),
                 "answer_lengths": np.full((1, args.train_batch), args.gen_length, np.int32)}
        state, metrics = trainer.step(state, jax.device_put(batch, trainer.batch_sharding))
        step += 1
        if step % 100 == 0:
            loss = float(metrics["loss"])
            log.append((step, round(time.perf_counter() - start, 1), loss))
            print(f"step {step}: loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    from flax import nnx

    from llada_jax.model import abstract_model

    graphdef, abstract = abstract_model(config)
    nnx.replace_by_pure_dict(abstract, jax.device_get(state.params))
    model = nnx.merge(graphdef, abstract)
    return model, {"steps": step, "seconds": round(time.perf_counter() - start, 1), "loss_log": log}


def settings(args):
    base = dict(method="semi_ar_padding", gen_length=args.gen_length, block_length=args.block_length)
    t = args.threshold
    return [
        dict(name="semi_ar, 1 token/step (baseline)", steps=args.gen_length, **base),
        dict(name="semi_ar + dual cache", steps=args.gen_length, cache="dual", **base),
        dict(name=f"threshold {t}", threshold=t, **base),
        dict(name=f"threshold {t} + prefix cache", threshold=t, cache="prefix", **base),
        dict(name=f"threshold {t} + dual cache", threshold=t, cache="dual", **base),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("copy", "reverse"), default="copy",
                   help="the answer is the ciphered prompt symbols in order (copy) or reversed")
    p.add_argument("--n", type=int, default=32, help="symbols per prompt (answer length)")
    p.add_argument("--gen_length", type=int, default=40)
    p.add_argument("--block_length", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train_batch", type=int, default=64)
    p.add_argument("--train_seconds", type=float, default=300)
    p.add_argument("--train_steps", type=int, default=100000)
    p.add_argument("--examples", type=int, default=256, help="held-out prompts")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per sampler call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default="", help="save the trained model here (Orbax run directory)")
    p.add_argument("--load", default="", help="skip training: load this model (saved with --save)")
    p.add_argument("--out", default="", help="write the results JSON here")
    args = p.parse_args()

    import jax

    from llada_jax.eval.analysis import compare_sampling_methods, format_table

    config = model_config(args)
    permutation = np.random.RandomState(1234).permutation(ALPHABET).astype(np.int32) + 0
    training = None
    if args.load:
        from llada_jax.checkpoints import load_pretrained

        model = load_pretrained(args.load)
    else:
        model, training = train(args, config, permutation)
        if args.save:
            from llada_jax.checkpoints import save_model

            save_model(model, args.save, step=training["steps"])
    prompts, answers = make_examples(np.random.RandomState(10_000 + args.seed), args.examples, args.n, permutation,
                                     config.bos_token_id, args.task)
    dataset = list(zip(prompts.tolist(), answers.tolist()))
    best = {}
    for repeat in range(args.repeats):
        for row in compare_sampling_methods(model, dataset, settings(args), batch_size=args.batch_size):
            if row["name"] not in best:
                best[row["name"]] = row
            elif row["seconds"] < best[row["name"]]["seconds"]:
                best[row["name"]].update(seconds=row["seconds"], tokens_per_s=row["tokens_per_s"])
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    rows = list(best.values())
    baseline = rows[0]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        row["accuracy_change_points"] = 100 * (row["accuracy"] - baseline["accuracy"])
    print(format_table(rows))
    for row in rows:
        print(f"{row['name']}: {row['speedup']:.2f}x tokens/s, accuracy {100 * row['accuracy']:.1f}% "
              f"({row['accuracy_change_points']:+.1f} points), NFE {row['nfe']:.1f}")
    if args.out:
        result = {"args": vars(args), "training": training, "rows": rows,
                  "machine": {"platform": platform.platform(), "python": platform.python_version(),
                              "jax": jax.__version__, "backend": jax.default_backend(),
                              "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count()},
                  "date": time.strftime("%Y-%m-%d")}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
