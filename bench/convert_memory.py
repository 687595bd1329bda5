"""Peak host memory of checkpoint conversion for a model of >= 1B parameters (a benchmark, not a test).

    PYTHONPATH=. python bench/convert_memory.py [--workdir /tmp/llada_convert_bench] [--dtype bfloat16]

Writes a random Hugging Face checkpoint of the given shape (tensor by tensor, sharded at 1GB), then runs, each
in a fresh process whose peak RSS (its own VmHWM at exit, file-backed pages included) is recorded:

    from-hf           llada-jax convert from-hf  (HF -> Orbax)
    to-hf             llada-jax convert to-hf    (Orbax -> HF)
    load_pretrained   llada_jax.checkpoints.load_pretrained(HF dir) -> a JAX model on the CPU
    baseline          python importing jax, orbax and llada_jax.checkpoints (the fixed cost in every row)

and compares each peak with the size on disk of the checkpoint read (target: at most 1.5x). It also checks
that the HF -> Orbax -> HF round trip gave back identical tensors. Prints a table, writes JSON (default
bench/convert_memory.json, next to this script, committed with the figures quoted in docs/BENCHMARKS.md) and
removes the checkpoints unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# Runs a module (-m NAME ARGS...) or code (-c CODE) and reports the process's own peak RSS (VmHWM) at exit.
# (ru_maxrss from wait4 is not used: on Linux a child inherits the high-water mark of the parent it was
# forked from, so it would report this script's own peak.)
_PEAK_WRAPPER = """
import atexit, runpy, sys
def report():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            sys.stderr.write('PEAK_RSS_KB %s\\n' % line.split()[1])
atexit.register(report)
if sys.argv[1] == '-m':
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
else:
    exec(sys.argv[2])
"""


def measure(args: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a fresh Python process running `-m MODULE ...` or `-c CODE`."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-4000:]}")
    peak_kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    return peak_kb[-1] * 1024, time.time() - start


def write_random_hf(path: str, config, dtype: str) -> None:
    import jax.numpy as jnp
    import numpy as np

    from llada_jax.checkpoints import hf_keys
    from llada_jax.checkpoints.hf_config import to_hf_config
    from llada_jax.checkpoints.hf_export import HF_FILES_DIR, MODELING_FILES
    from llada_jax.checkpoints.safetensors_io import ShardedWriter, dtype_name

    np_dtype = np.dtype(jnp.dtype(dtype))
    entries = [(t.key, t.entry.param, t.hf_shape) for t in hf_keys.tensors(config)]
    os.makedirs(path)
    writer = ShardedWriter(path, [(k, dtype_name(np_dtype), s) for k, _, s in entries], max_shard_size="1GB")
    rng = np.random.default_rng(0)
    for key, name, shape in entries:
        if name.endswith("norm") or name == "ln_f":
            value = np.ones(shape, np_dtype)
        else:
            value = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)
        writer.write(key, value)
        del value
    writer.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(config, dtype), f, indent=2)
    for name in MODELING_FILES:
        shutil.copy2(os.path.join(HF_FILES_DIR, name), os.path.join(path, name))


def same_tensors(a: str, b: str) -> bool:
    from llada_jax.checkpoints.safetensors_io import TensorReader

    ra, rb = TensorReader(a), TensorReader(b)
    if set(ra.tensors) != set(rb.tensors):
        return False
    return all(ra.read(k).tobytes() == rb.read(k).tobytes() for k in ra.tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/llada_convert_bench")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "convert_memory.json"),
                   help="where the results go (default: bench/convert_memory.json)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--d_model", type=int, default=2048)
    p.add_argument("--n_layers", type=int, default=16)
    p.add_argument("--n_heads", type=int, default=16)
    p.add_argument("--mlp_hidden_size", type=int, default=5504)
    p.add_argument("--vocab_size", type=int, default=126464)
    p.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    args = p.parse_args()

    from llada_jax.config import LLaDAConfig
    from llada_jax.model import count_params

    config = LLaDAConfig.llada_8b(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                                  n_kv_heads=args.n_heads, mlp_hidden_size=args.mlp_hidden_size,
                                  vocab_size=args.vocab_size, embedding_size=args.vocab_size,
                                  **({} if args.vocab_size == 126464 else dict(  # smaller vocabularies (trials)
                                      mask_token_id=args.vocab_size - 1, eos_token_id=args.vocab_size - 2,
                                      pad_token_id=args.vocab_size - 2, bos_token_id=args.vocab_size - 3)))
    n_params = count_params(config)
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, ckpt, back = (os.path.join(args.workdir, name) for name in ("hf", "orbax", "hf_back"))
    print(f"{n_params:,} parameters ({args.dtype}); writing a random HF checkpoint to {hf} ...", flush=True)
    t = time.time()
    write_random_hf(hf, config, args.dtype)
    print(f"  {dir_bytes(hf) / 1e9:.2f} GB in {time.time() - t:.0f} s", flush=True)

    rows = []

    def run(step, cmd, read_path):
        print(f"{step} ...", flush=True)
        peak, seconds = measure(cmd)
        size = dir_bytes(read_path)
        rows.append(dict(step=step, checkpoint_read=os.path.relpath(read_path, args.workdir), checkpoint_bytes=size,
                         peak_rss_bytes=peak, peak_over_checkpoint=round(peak / size, 3), seconds=round(seconds, 1)))

    baseline, _ = measure(["-c", "import jax, orbax.checkpoint, llada_jax.checkpoints.hf_import, "
                                 "llada_jax.checkpoints.orbax_model; jax.devices()"])
    run("from-hf", ["-m", "llada_jax", "convert", "from-hf", "--input", hf, "--output", ckpt], hf)
    run("to-hf", ["-m", "llada_jax", "convert", "to-hf", "--input", ckpt, "--output", back], ckpt)
    run("load_pretrained", ["-c", f"from llada_jax.checkpoints import load_pretrained; load_pretrained({hf!r})"], hf)
    identical = same_tensors(hf, back)

    print(f"\n{n_params:,} parameters, {args.dtype}; baseline RSS (imports) {baseline / 1e9:.2f} GB")
    print(f"{'step':<16} {'checkpoint read':>16} {'peak RSS':>10} {'peak/ckpt':>10} {'time':>8}")
    for r in rows:
        print(f"{r['step']:<16} {r['checkpoint_bytes'] / 1e9:>13.2f} GB {r['peak_rss_bytes'] / 1e9:>7.2f} GB "
              f"{r['peak_over_checkpoint']:>10.2f} {r['seconds']:>6.0f} s")
    print(f"HF -> Orbax -> HF tensors identical: {identical}")

    mem_total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    result = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        machine=dict(cpus=os.cpu_count(), memory_bytes=mem_total, platform=platform.platform(),
                     python=platform.python_version()),
        parameters=n_params, dtype=args.dtype, config=config.to_dict(), baseline_rss_bytes=baseline,
        target_peak_over_checkpoint=1.5, rows=rows, round_trip_identical=identical,
    )
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    if not identical or any(r["peak_over_checkpoint"] > 1.5 for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
