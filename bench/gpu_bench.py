"""GPU benchmarks at LLaDA-8B shapes (run by bench/gpu.sh): train-step MFU on a slice of the layers, and
sampler tokens/s with random weights. Each subcommand writes one JSON file and prints one summary line.

    python bench/gpu_bench.py train  --out DIR [--layers 4 --length 4096 --batch 4 --steps 8]
    python bench/gpu_bench.py sample --out DIR [--batches 1 8 --prompt 128 --gen 256 --block 32 --steps 128]
    python bench/gpu_bench.py matmul --out DIR
    ... --tiny: tiny shapes (any backend, e.g. CPU): checks the script end to end in a minute.

train: the project's jitted train step (`Trainer.step`: forward process, pretraining loss, AdamW, bf16
compute with float32 master weights, cuDNN flash attention) on `--layers` of the 32 LLaDA-8B layers at full
width (d_model 4096, 32 heads, MLP 12288, vocabulary 126464, untied head), so a slice fits one GPU with its
optimizer state. MFU = analytic model FLOPs (`flops_per_token`) per second / the device's dense bf16 peak
(`PEAK_FLOPS`, 989 TFLOP/s for an H200). With 4 of 32 layers the output head is about 40% of the slice's
FLOPs (6.5% of the full model's), so the slice's MFU weighs the vocabulary projection and its loss more
than the full model would. If the batch does not fit, it is halved (and said so in the JSON).

sample: `create_sampler("semi_ar_padding", ...)` on a random LLaDA-8B (bf16 parameters) for each batch
size: generated tokens/s and NFE, best of --reps timed runs after the compile run.

matmul: the measured bf16 matmul peak of the device (8192^3), for reference next to the nominal peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, create_sampler, sharding  # noqa: E402
from llada_jax.config import train_config  # noqa: E402
from llada_jax.train.step import Trainer, flops_per_token, peak_flops_per_device  # noqa: E402


def device_info() -> dict:
    d = jax.devices()[0]
    info = {"backend": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        stats = d.memory_stats() or {}
        info["bytes_limit"] = stats.get("bytes_limit")
    except Exception:  # CPU devices have no memory stats
        pass
    return info


def is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Out of memory" in text


def write(out: str, name: str, result: dict) -> None:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}", flush=True)


# ----------------------------------------------------------------------------------------------------


def train(args) -> dict:
    if args.tiny:
        cfg = LLaDAConfig.tiny(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=384,
                               vocab_size=1024, mask_token_id=1023, eos_token_id=1022, pad_token_id=1022,
                               bos_token_id=1021, max_sequence_length=4096)
        length, batch = 128, 4
    else:
        cfg = LLaDAConfig.llada_8b(n_layers=args.layers)
        length, batch = args.length, args.batch
    cfg = cfg.replace(dtype=args.dtype, param_dtype="float32", remat_policy=args.remat, scan_layers=True)
    peak = peak_flops_per_device()
    attempts = []
    while batch >= 1:
        try:
            return {**run_train(cfg, batch, length, args.steps, peak), "attempts": attempts}
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            attempts.append({"batch": batch, "error": str(e).splitlines()[0][:300]})
            print(f"batch {batch} does not fit: halving", flush=True)
            batch //= 2
            jax.clear_caches()
    raise RuntimeError(f"even batch 1 does not fit: {attempts}")


def run_train(cfg: LLaDAConfig, batch: int, length: int, steps: int, peak) -> dict:
    c = train_config(cfg)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = batch, 1, length
    c.random_length_prob, c.warmup_steps, c.max_steps = 0.0, 10, 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    trainer = Trainer(c, cfg, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    t = time.perf_counter()
    state = trainer.init_state(0)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size - 1000, (1, batch, length)).astype(np.int32)
    b = jax.device_put({"input_ids": ids}, trainer.batch_sharding)
    t = time.perf_counter()
    compiled = trainer.lower(state, b).compile()
    compile_s = time.perf_counter() - t
    memory = None
    try:
        ma = compiled.memory_analysis()
        memory = {k: getattr(ma, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                              "temp_size_in_bytes", "generated_code_size_in_bytes")}
    except Exception:  # noqa: BLE001
        pass
    times, losses = [], []
    with jax.set_mesh(trainer.mesh), nnx.logical_axis_rules(trainer.rules):
        for i in range(steps + 1):  # the first run is a warm-up
            t = time.perf_counter()
            state, m = compiled(state, b)
            losses.append(float(m["loss"]))
            if i:
                times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tokens = batch * length
    flops = flops_per_token(cfg, length) * tokens
    head_flops = 6.0 * cfg.d_model * cfg.padded_vocab_size * tokens
    out = {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "vocab": cfg.padded_vocab_size, "batch": batch,
           "length": length, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat_policy,
           "attention_impl": cfg.attention_impl, "init_s": init_s, "compile_s": compile_s, "step_s": step_s,
           "step_s_all": times, "tokens_per_s": tokens / step_s, "model_tflops_per_s": flops / step_s / 1e12,
           "head_share_of_flops": head_flops / flops, "peak_tflops": None if peak is None else peak / 1e12,
           "mfu": None if peak is None else flops / step_s / peak, "losses": losses, "memory": memory}
    print(f"train: {cfg.n_layers} layers, batch {batch} x {length}, {cfg.dtype}: {step_s:.3f} s/step, "
          f"{tokens / step_s:,.0f} tokens/s, {flops / step_s / 1e12:.1f} TFLOP/s"
          + ("" if peak is None else f", MFU {flops / step_s / peak:.1%}"), flush=True)
    return out


# ----------------------------------------------------------------------------------------------------


def sample(args) -> dict:
    if args.tiny:
        cfg = LLaDAConfig.tiny(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=384,
                               vocab_size=1024, mask_token_id=1023, eos_token_id=1022, pad_token_id=1022,
                               bos_token_id=1021)
        prompt_len, gen, block, steps, batches = 16, 32, 16, 16, [1, 2]
    else:
        cfg = LLaDAConfig.llada_8b()
        prompt_len, gen, block, steps, batches = args.prompt, args.gen, args.block, args.steps, args.batches
    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    t = time.perf_counter()
    model = nnx.jit(lambda: LLaDAForMaskedLM(cfg, rngs=nnx.Rngs(0)))()
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - t
    rows = []
    for batch in batches:
        prompt = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0, cfg.vocab_size - 1000,
                                    dtype=jnp.int32)
        sampler = create_sampler("semi_ar_padding", gen_length=gen, block_length=block, steps=steps,
                                 temperature=0.0, remasking="low_confidence")
        try:
            t = time.perf_counter()
            ids, stats = sampler(model, prompt, rng=0, return_stats=True)
            ids.block_until_ready()
            compile_s = time.perf_counter() - t
            best = float("inf")
            for _ in range(args.reps):
                t = time.perf_counter()
                ids, stats = sampler(model, prompt, rng=0, return_stats=True)
                ids.block_until_ready()
                best = min(best, time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            rows.append({"batch": batch, "error": str(e).splitlines()[0][:300]})
            continue
        nfe = int(np.asarray(stats.nfe)[0])
        row = {"batch": batch, "prompt": prompt_len, "gen_length": gen, "block_length": block, "steps": steps,
               "nfe": nfe, "compile_and_first_s": compile_s, "seconds": best,
               "tokens_per_s": batch * gen / best, "forward_ms": best / int(stats.forward_calls) * 1e3}
        rows.append(row)
        write(args.out, "sample.partial", {"rows": rows})  # kept if the time limit stops the next batch
        print(f"sample: batch {batch}, prompt {prompt_len}, gen {gen}, block {block}, NFE {nfe}: {best:.2f} s, "
              f"{row['tokens_per_s']:.1f} tokens/s, {row['forward_ms']:.1f} ms per forward", flush=True)
    return {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "dtype": cfg.dtype, "init_s": init_s, "rows": rows}


# ----------------------------------------------------------------------------------------------------


def matmul(args) -> dict:
    n = 512 if args.tiny else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)

    @jax.jit
    def chain(x):
        for _ in range(8):
            x = (x @ a) * jnp.bfloat16(1 / np.sqrt(n))
        return x

    chain(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        chain(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    tflops = 8 * 2 * n**3 / best / 1e12
    peak = peak_flops_per_device()
    print(f"matmul: bf16 {n}^3: {tflops:.1f} TFLOP/s"
          + ("" if peak is None else f" ({tflops * 1e12 / peak:.1%} of the nominal {peak / 1e12:.0f})"), flush=True)
    return {"n": n, "tflops": tflops, "nominal_peak_tflops": None if peak is None else peak / 1e12}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("train", "sample", "matmul"))
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/results/gpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on any backend (a check of the script)")
    p.add_argument("--layers", type=int, default=4, help="train: LLaDA-8B layers in the slice")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="train: first batch tried (halved until it fits)")
    p.add_argument("--dtype", default="bfloat16", help="train: compute dtype")
    p.add_argument("--remat", default="none", help="train: remat policy")
    p.add_argument("--steps", type=int, default=None, help="train: timed steps (8); sample: denoising steps (128)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="sample: batch sizes")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="sample: timed runs per batch size")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 8 if args.what == "train" else 128
    result = {"what": args.what, "args": vars(args), "device": device_info(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        result.update({"train": train, "sample": sample, "matmul": matmul}[args.what](args))
        status = 0
    except Exception as e:  # noqa: BLE001  (the JSON records the failure for the report)
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        status = 1
    write(args.out, args.what, result)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
