"""Train-step throughput: this project's jitted JAX step vs PyTorch (eager and torch.compile) vs the matmul peak.

For each model width, in one process and on the same model shapes and dtype:

- jax:           `llada_jax.train.step.Trainer.step` (forward process, model, pretraining loss, gradient,
                 clipping, AdamW, the non-finite guard and the step metrics), one jitted program.
- torch_eager:   the project's PyTorch modeling file (`llada_jax/convert/hf_files/modeling_llada.py`) with the
                 same initial weights, the same forward process and loss (CE / p_mask over masked tokens,
                 / (B * L)), global-norm clipping and AdamW with the same hyperparameters
                 (`bench/torch_baseline.PretrainStep`).
- torch_compile: the same, with the forward and loss through `torch.compile` (Inductor).
- matmul peaks:  FLOP/s of a chain of n x n x n matmuls (n = max(d_model, 1024)), jitted in JAX and torch.mm in
                 PyTorch: each framework's practical peak in this process.

FLOPs are the analytic model FLOPs (`llada_jax.train.step.flops_per_token`: 6 x matmul parameters + attention),
the same count for every framework, so FLOP/s over peak is a model-FLOPs utilisation. The variants are measured
in interleaved rounds (one step of each, then both peaks, repeated), so a load change on a shared machine
hits all of them; the figures are medians over the rounds (the JSON also holds the minima / maxima).

Both frameworks get the same CPUs: the process is pinned to `--threads` cores before JAX or PyTorch start
(XLA:CPU sizes its thread pool from the schedulable CPUs) and `torch.set_num_threads(--threads)`.

    python bench/train_step.py --d_model 256 512 1024 --json bench/results/train_step.json
    python bench/train_step.py --no_torch        # the JAX step and peak only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time


def _pin_threads(argv) -> int:
    """Pin this process to the first --threads CPUs before any framework starts its thread pools."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=0)
    n = p.parse_known_args(argv)[0].threads
    cpus = sorted(os.sched_getaffinity(0))
    n = len(cpus) if n <= 0 else min(n, len(cpus))
    os.sched_setaffinity(0, cpus[:n])
    return n


THREADS = _pin_threads(sys.argv[1:]) if __name__ == "__main__" else len(os.sched_getaffinity(0))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import sharding  # noqa: E402
from llada_jax.config import LLaDAConfig, train_config  # noqa: E402
from llada_jax.train.step import Trainer, flops_per_token  # noqa: E402

VARIANTS = ("jax", "torch_eager", "torch_compile")


def model_config(d_model: int, n_layers: int, vocab: int, dtype: str, **overrides) -> LLaDAConfig:
    return LLaDAConfig(d_model=d_model, n_layers=n_layers, n_heads=max(d_model // 64, 1), n_kv_heads=None,
                       mlp_hidden_size=3 * d_model, vocab_size=vocab, max_sequence_length=4096,
                       mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2,
                       bos_token_id=vocab - 3, dtype=dtype, param_dtype="float32", **overrides)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def jax_matmul(n: int, dtype: str, chain: int = 4):
    """A callable running `chain` jitted n x n x n matmuls; returns (callable, FLOPs per call)."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n), dtype) / np.sqrt(n)

    @jax.jit
    def run(x):
        for _ in range(chain):
            x = x @ a
        return x

    state = {"x": run(a).block_until_ready()}

    def call():
        state["x"] = run(state["x"]).block_until_ready()

    return call, chain * 2.0 * n**3


def torch_matmul(n: int, dtype: str, chain: int = 4):
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dt) / n**0.5

    def call():
        x = a
        for _ in range(chain):
            x = torch.mm(x, a)

    call()
    return call, chain * 2.0 * n**3


def jax_step(cfg: LLaDAConfig, batch: int, length: int):
    """The project's train step as a callable (state kept between calls), its parameters, and compile time."""
    c = train_config(cfg)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = batch, 1, length
    c.random_length_prob, c.warmup_steps, c.max_steps = 0.0, 1, 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    trainer = Trainer(c, cfg, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size - 3, (1, batch, length)).astype(np.int32)
    b = jax.device_put({"input_ids": ids}, trainer.batch_sharding)
    holder = {"state": trainer.init_state(0)}

    def call():
        holder["state"], m = trainer.step(holder["state"], b)
        jax.block_until_ready(m)
        return m

    compile_s = timed(call)
    return call, compile_s, ids[0], c


def torch_step(cfg: LLaDAConfig, train_cfg, ids: np.ndarray, compile: bool):
    import torch

    from bench.torch_baseline import PretrainStep, torch_model
    from llada_jax.convert.keys import hf_state_dict
    from llada_jax.model import LLaDAForMaskedLM

    jax_model = LLaDAForMaskedLM(cfg, rngs=nnx.Rngs(0))  # the JAX step's initial weights (init_state(0))
    model = torch_model(cfg, hf_state_dict(jax_model), dtype=getattr(torch, cfg.dtype))
    o = train_cfg.optimizer
    step = PretrainStep(model, mask_id=cfg.mask_token_id, eps=float(train_cfg.eps),
                        lr=float(train_cfg.learning_rate), betas=(float(o.b1), float(o.b2)), adam_eps=float(o.eps),
                        weight_decay=float(o.weight_decay), grad_clip=float(o.grad_clip), compile=compile)
    t_ids = torch.from_numpy(ids.astype(np.int64))
    compile_s = timed(lambda: step(t_ids))
    return (lambda: step(t_ids)), compile_s, step.optimizer_impl


def measure(d: int, args) -> dict:
    cfg = model_config(d, args.n_layers, args.vocab, args.dtype)
    tokens = args.batch * args.length
    flops = flops_per_token(cfg, args.length) * tokens
    n = max(d, 1024)
    calls, compile_s, extra = {}, {}, {}
    calls["jax"], compile_s["jax"], ids, train_cfg = jax_step(cfg, args.batch, args.length)
    peaks = {"jax": jax_matmul(n, args.dtype)}
    if not args.no_torch:
        calls["torch_eager"], compile_s["torch_eager"], extra["torch_optimizer"] = torch_step(
            cfg, train_cfg, ids, compile=False)
        if not args.no_compile:
            calls["torch_compile"], compile_s["torch_compile"], _ = torch_step(cfg, train_cfg, ids, compile=True)
        peaks["torch"] = torch_matmul(n, args.dtype)
    for call in calls.values():  # one more untimed step each (allocator and cache warm-up)
        call()
    times = {k: [] for k in calls}
    peak_times = {k: [] for k in peaks}
    for _ in range(args.steps):  # interleaved rounds
        for k, call in calls.items():
            times[k].append(timed(call))
        for k, (call, _) in peaks.items():
            peak_times[k].append(timed(call))

    row = {"d_model": d, "n_layers": args.n_layers, "n_heads": cfg.n_heads, "mlp": cfg.mlp_hidden_size,
           "vocab": args.vocab, "batch": args.batch, "length": args.length, "dtype": args.dtype,
           "flops_per_step": flops, "peak_matmul_n": n, **extra}
    for k, (_, peak_flops) in peaks.items():
        row[f"{k}_peak_gflops"] = peak_flops / float(np.median(peak_times[k])) / 1e9
        row[f"{k}_peak_gflops_max"] = peak_flops / min(peak_times[k]) / 1e9
    for k, ts in times.items():
        step_s = float(np.median(ts))
        peak = row["jax_peak_gflops" if k == "jax" else "torch_peak_gflops"]
        row[k] = {"step_s": step_s, "step_s_min": min(ts), "step_s_all": ts, "compile_s": compile_s[k],
                  "tokens_per_s": tokens / step_s, "gflops_per_s": flops / step_s / 1e9,
                  "fraction_of_own_peak": flops / step_s / 1e9 / peak}
    torch_rates = [row[k]["tokens_per_s"] for k in ("torch_eager", "torch_compile") if k in row]
    if torch_rates:
        row["jax_over_best_torch"] = row["jax"]["tokens_per_s"] / max(torch_rates)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'d_model':>7} {'variant':>14} {'tokens/s':>9} {'GFLOP/s':>8} {'peak GFLOP/s':>12} {'of peak':>8} "
          f"{'step s':>7} {'compile s':>9} {'JAX/best torch':>14}")
    for r in rows:
        for k in VARIANTS:
            if k not in r:
                continue
            v = r[k]
            peak = r["jax_peak_gflops" if k == "jax" else "torch_peak_gflops"]
            ratio = f"{r['jax_over_best_torch']:.2f}x" if k == "jax" and "jax_over_best_torch" in r else ""
            print(f"{r['d_model']:>7} {k:>14} {v['tokens_per_s']:>9.0f} {v['gflops_per_s']:>8.1f} {peak:>12.1f} "
                  f"{v['fraction_of_own_peak']:>8.1%} {v['step_s']:>7.3f} {v['compile_s']:>9.1f} {ratio:>14}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="interleaved timing rounds (after compile + 1 warm-up)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="CPUs for both frameworks (0: all schedulable)")
    p.add_argument("--no_torch", action="store_true", help="measure the JAX step and peak only")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if not args.no_torch:
        import torch

        torch.set_num_threads(THREADS)
        torch.manual_seed(0)

    rows = []
    for d in args.d_model:
        rows.append(measure(d, args))
        print_table(rows[-1:])
        sys.stdout.flush()
    print()
    print_table(rows)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(), "cpus": sorted(os.sched_getaffinity(0)),
              "threads": THREADS, "load_average": os.getloadavg(), "jax": jax.__version__,
              "devices": [d.device_kind for d in jax.devices()[:1]], "args": vars(args), "rows": rows}
    if not args.no_torch:
        import torch

        result.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
