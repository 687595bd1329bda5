"""Train-step throughput: this project's jitted JAX step vs PyTorch (eager and torch.compile) vs the matmul peak.

For each model width, in one process and on the same model shapes and dtype:

- jax:           `llada_jax.train.step.Trainer.step` (forward process, model, pretraining loss, gradient,
                 clipping, AdamW, the non-finite guard and the step metrics), one jitted program.
- torch_eager:   the project's PyTorch modeling file (`llada_jax/checkpoints/hf_files/modeling_llada.py`) with the
                 same initial weights, the same forward process and loss (CE / p_mask over masked tokens,
                 / (B * L)), global-norm clipping and AdamW with the same hyperparameters
                 (`bench/torch_baseline.PretrainStep`).
- torch_compile: the same, with the forward and loss through `torch.compile` (Inductor).
- jax_unrolled:  with --jax_unrolled, the JAX step of the same model with scan_layers=False (XLA:CPU then
                 slices no stacked weights or per-layer residuals; same FLOPs).
- matmul peaks:  each framework's practical peak in this process: per round, the best FLOP/s of three float32
                 matmuls (a chain of four n x n x n with n = max(d_model, 1024), one 2048^3, and the model's
                 own largest projection [tokens, d_model] x [d_model, mlp]), jitted in JAX, torch.mm in PyTorch.

FLOPs are the analytic model FLOPs (`llada_jax.train.step.flops_per_token`: 6 x matmul parameters + attention),
the same count for every framework, so FLOP/s over peak is a model-FLOPs utilisation. The variants are measured
in interleaved rounds (per variant an untimed step, then --steps timed ones; then both peaks), so a load
change on a shared machine hits all of them, while the cost of switching frameworks (the first step after
the other framework ran is up to 2x slower: caches, freed and re-faulted memory) stays out of the figures.
Step times are medians over all timed steps, peaks medians over the rounds (the JSON has all the times).

Both frameworks get the same CPUs and process settings (`bench/process_setup.py`): the process is pinned to
`--threads` cores before JAX or PyTorch start (XLA:CPU sizes its thread pool from the schedulable CPUs) and
`torch.set_num_threads(--threads)`; OpenMP waits passively; malloc uses huge pages (`--no_hugepages`: not).
The learning-rate schedule is the only difference in the update: warmup then cosine in JAX, constant in PyTorch.

    python bench/train_step.py --d_model 256 512 1024     # writes bench/train_step.json
    python bench/train_step.py --no_torch        # the JAX step and peak only
    python bench/train_step.py --jax_unrolled    # also the unrolled-layers JAX step
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.process_setup import HUGEPAGES, setup_process  # noqa: E402

THREADS = setup_process(sys.argv[1:], __file__) if __name__ == "__main__" else len(os.sched_getaffinity(0))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llada_jax import sharding  # noqa: E402
from llada_jax.config import LLaDAConfig, train_config  # noqa: E402
from llada_jax.train.step import Trainer, flops_per_token  # noqa: E402

VARIANTS = ("jax", "jax_unrolled", "torch_eager", "torch_compile")


def model_config(d_model: int, n_layers: int, vocab: int, dtype: str, **overrides) -> LLaDAConfig:
    return LLaDAConfig(d_model=d_model, n_layers=n_layers, n_heads=max(d_model // 64, 1), n_kv_heads=None,
                       mlp_hidden_size=3 * d_model, vocab_size=vocab, max_sequence_length=4096,
                       mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2,
                       bos_token_id=vocab - 3, dtype=dtype, param_dtype="float32", **overrides)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_shapes(d: int, tokens: int, mlp: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, chain) matmuls whose best FLOP/s is the practical peak: a chain of square matmuls of the
    model's order of size, one large square matmul, and the model's own largest projection."""
    n = max(d, 1024)
    return [(n, n, n, 4), (2048, 2048, 2048, 1), (tokens, d, mlp, 1)]


def jax_matmuls(shapes, dtype: str):
    """A callable per shape running its jitted matmul(s); returns [(callable, FLOPs per call)]."""
    out = []
    rs = np.random.RandomState(0)
    for m, k, n, chain in shapes:
        a = jnp.asarray(rs.randn(m, k) / np.sqrt(k), dtype)
        b = jnp.asarray(rs.randn(k, n) / np.sqrt(n), dtype)

        @jax.jit
        def run(x, b=b, chain=chain):
            for _ in range(chain):
                x = x @ b
            return x

        run(a).block_until_ready()
        out.append((lambda run=run, a=a: run(a).block_until_ready(), chain * 2.0 * m * k * n))
    return out


def torch_matmuls(shapes, dtype: str):
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    out = []
    for m, k, n, chain in shapes:
        a = (torch.randn(m, k, generator=g) / k**0.5).to(dt)
        b = (torch.randn(k, n, generator=g) / n**0.5).to(dt)

        def call(a=a, b=b, chain=chain):
            x = a
            for _ in range(chain):
                x = torch.mm(x, b)

        call()
        out.append((call, chain * 2.0 * m * k * n))
    return out


def train_setup(cfg: LLaDAConfig, batch: int, length: int):
    """The training config of the step (the project's defaults: AdamW, clipping, ...) and a batch of ids."""
    c = train_config(cfg)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = batch, 1, length
    c.random_length_prob, c.warmup_steps, c.max_steps = 0.0, 1, 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size - 3, (batch, length)).astype(np.int32)
    return c, ids


def jax_step(cfg: LLaDAConfig, c, ids: np.ndarray):
    """The project's train step as a callable (state kept between calls) and its compile time."""
    trainer = Trainer(c, cfg, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    b = jax.device_put({"input_ids": ids[None]}, trainer.batch_sharding)
    holder = {"state": trainer.init_state(0)}

    def call():
        holder["state"], m = trainer.step(holder["state"], b)
        jax.block_until_ready(m)
        return m

    return call, timed(call)


def torch_step(cfg: LLaDAConfig, train_cfg, ids: np.ndarray, compile: bool):
    import torch

    from bench.torch_baseline import PretrainStep, torch_model
    from llada_jax.checkpoints.hf_keys import hf_state_dict
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
    shapes = matmul_shapes(d, tokens, cfg.mlp_hidden_size)
    calls, compile_s, extra = {}, {}, {}
    train_cfg, ids = train_setup(cfg, args.batch, args.length)
    peaks = {}
    if not args.no_jax:
        calls["jax"], compile_s["jax"] = jax_step(cfg, train_cfg, ids)
        if args.jax_unrolled:  # the same step with the layers unrolled (scan_layers=False)
            unrolled = model_config(d, args.n_layers, args.vocab, args.dtype, scan_layers=False)
            calls["jax_unrolled"], compile_s["jax_unrolled"] = jax_step(unrolled, train_cfg, ids)
        peaks["jax"] = jax_matmuls(shapes, args.dtype)
    if not args.no_torch:
        calls["torch_eager"], compile_s["torch_eager"], extra["torch_optimizer"] = torch_step(
            cfg, train_cfg, ids, compile=False)
        if not args.no_compile:
            calls["torch_compile"], compile_s["torch_compile"], _ = torch_step(cfg, train_cfg, ids, compile=True)
        peaks["torch"] = torch_matmuls(shapes, args.dtype)
    times = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    faults = {k: [] for k in calls}
    peak_rates = {k: [] for k in peaks}  # per round: the best FLOP/s over the shapes
    shape_rates = {k: [[] for _ in shapes] for k in peaks}
    for _ in range(args.rounds):  # interleaved rounds
        for k, call in calls.items():
            call()  # untimed: the first step after the other framework ran pays for its caches and memory
            for _ in range(args.steps):
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                times[k].append(timed(call))
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu[k].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                faults[k].append(r1.ru_minflt + r1.ru_majflt - r0.ru_minflt - r0.ru_majflt)
        for k, fns in peaks.items():
            for call, _ in fns:
                call()
            rates = [f / timed(call) for call, f in fns]
            for i, r in enumerate(rates):
                shape_rates[k][i].append(r)
            peak_rates[k].append(max(rates))

    row = {"d_model": d, "n_layers": args.n_layers, "n_heads": cfg.n_heads, "mlp": cfg.mlp_hidden_size,
           "vocab": args.vocab, "batch": args.batch, "length": args.length, "dtype": args.dtype,
           "flops_per_step": flops, "peak_shapes": shapes, **extra}
    for k in peaks:
        row[f"{k}_peak_gflops"] = float(np.median(peak_rates[k])) / 1e9
        row[f"{k}_peak_gflops_max"] = max(peak_rates[k]) / 1e9
        row[f"{k}_peak_gflops_by_shape"] = [float(np.median(r)) / 1e9 for r in shape_rates[k]]
    for k, ts in times.items():
        step_s = float(np.median(ts))
        peak = row[f"{k.split('_')[0]}_peak_gflops"]
        row[k] = {"step_s": step_s, "step_s_min": min(ts), "step_s_all": ts, "compile_s": compile_s[k],
                  "cpu_s": float(np.median(cpu[k])), "page_faults": int(np.median(faults[k])),
                  "tokens_per_s": tokens / step_s, "gflops_per_s": flops / step_s / 1e9,
                  "fraction_of_own_peak": flops / step_s / 1e9 / peak}
    torch_rates = [row[k]["tokens_per_s"] for k in ("torch_eager", "torch_compile") if k in row]
    if torch_rates and "jax" in row:
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
            peak = r[f"{k.split('_')[0]}_peak_gflops"]
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
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds over the variants")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round, after an untimed one")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="CPUs for both frameworks (0: all schedulable)")
    p.add_argument("--no_hugepages", action="store_true", help="do not re-run under GLIBC_TUNABLES=" + HUGEPAGES)
    p.add_argument("--no_torch", action="store_true", help="measure the JAX step and peak only")
    p.add_argument("--no_jax", action="store_true", help="measure the PyTorch steps and peak only")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--jax_unrolled", action="store_true",
                   help="also the JAX step with scan_layers=False (layers unrolled), in the same rounds")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.json"),
                   help="write the results here")
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
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
              "processor": platform.processor() or platform.machine(), "cpus": sorted(os.sched_getaffinity(0)),
              "threads": THREADS, "load_average": os.getloadavg(), "jax": jax.__version__,
              "devices": [d.device_kind for d in jax.devices()[:1]], "args": vars(args), "rows": rows}
    if not args.no_torch:
        import torch

        result.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
