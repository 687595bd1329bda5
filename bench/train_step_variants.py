"""Before / after of the model's CPU optimisations, in one process: the JAX train step compiled with each
variant of the model code, timed in interleaved rounds (medians; CPU time and page faults in the JSON).

Variants:
- `before`: attention by jax.nn.dot_product_attention (its XLA implementation), as the model had it;
- `after`:  the model's attention (4-D heads-major layout, softmax normalised after the PV matmul,
            flash-attention form of the backward pass): the current model.

    python bench/train_step_variants.py --d_model 256 512 1024     # writes bench/train_step_variants.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.process_setup import setup_process  # noqa: E402

THREADS = setup_process(sys.argv[1:], __file__) if __name__ == "__main__" else len(os.sched_getaffinity(0))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.train_step import jax_step, model_config, timed, train_setup  # noqa: E402
from llada_jax.model import block as model_module  # noqa: E402  (the block calls `attention`)
from llada_jax.train.step import flops_per_token  # noqa: E402

VARIANTS = ("before", "after")


def jax_nn_attention(q, k, v, key_mask, impl):
    """The model's attention before: jax.nn.dot_product_attention's XLA implementation."""
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


@contextlib.contextmanager
def model_variant(name: str):
    """Patch the model module while a step is traced and compiled (the compiled step keeps the variant)."""
    saved = model_module.attention
    if name == "before":
        model_module.attention = jax_nn_attention
    try:
        yield
    finally:
        model_module.attention = saved


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no_hugepages", action="store_true", help="see bench/process_setup.py")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_variants.json"))
    args = p.parse_args()
    rows = []
    for d in args.d_model:
        cfg = model_config(d, args.n_layers, args.vocab, "float32")
        train_cfg, ids = train_setup(cfg, args.batch, args.length)
        calls = {}
        for name in VARIANTS:
            with model_variant(name):
                calls[name], _ = jax_step(cfg, train_cfg, ids)  # compiles (and runs once) under the patch
        for call in calls.values():
            call()
        times = {k: [] for k in calls}
        cpu = {k: [] for k in calls}
        faults = {k: [] for k in calls}
        for _ in range(args.rounds):
            for k, call in calls.items():
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                times[k].append(timed(call))
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu[k].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                faults[k].append(r1.ru_minflt - r0.ru_minflt)
        flops = flops_per_token(cfg, args.length) * args.batch * args.length
        before = float(np.median(times["before"]))
        for k in VARIANTS:
            step_s = float(np.median(times[k]))
            rows.append({"d_model": d, "variant": k, "step_s": step_s, "step_s_all": times[k],
                         "cpu_s": float(np.median(cpu[k])), "page_faults": int(np.median(faults[k])),
                         "tokens_per_s": args.batch * args.length / step_s, "gflops_per_s": flops / step_s / 1e9,
                         "speedup_vs_before": before / step_s})
    print(f"{'d_model':>7} {'variant':>10} {'step s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'vs before':>9}")
    for r in rows:
        print(f"{r['d_model']:>7} {r['variant']:>10} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} "
              f"{r['gflops_per_s']:8.1f} {r['speedup_vs_before']:8.2f}x")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "threads": THREADS, "load_average": os.getloadavg(),
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "jax": jax.__version__,
              "args": vars(args), "rows": rows}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
