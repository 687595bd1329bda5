"""Process settings shared by the CPU benchmarks that run JAX and PyTorch side by side in one process.

Call `setup_process(sys.argv[1:], __file__)` first thing, before JAX or PyTorch are imported.
"""

from __future__ import annotations

import argparse
import os
import sys

HUGEPAGES = "glibc.malloc.hugetlb=1"


def setup_process(argv, script: str) -> int:
    """Before JAX or PyTorch start: the process settings both frameworks run under. Returns the thread count.

    - Pin the process to the first --threads CPUs (XLA:CPU sizes its thread pool from the schedulable CPUs;
      PyTorch gets torch.set_num_threads(--threads) in main).
    - OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP workers otherwise spin after each parallel region and take
      the cores from XLA's threads when the two frameworks alternate in one process (measured: both steps
      2-3x slower).
    - Unless --no_hugepages: re-run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35; ignored by
      older ones), so that malloc backs its large blocks with transparent huge pages. Both frameworks take
      fresh multi-megabyte buffers from malloc at every step; with 4 KiB pages every first touch is a page
      fault (about 0.2 s of kernel time per d_model-512 JAX step here, 1/6 of the step).
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no_hugepages", action="store_true")
    known = p.parse_known_args(argv)[0]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not known.no_hugepages and HUGEPAGES not in tunables:
        env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGEPAGES) if t))
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *argv], env)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cpus = sorted(os.sched_getaffinity(0))
    n = len(cpus) if known.threads <= 0 else min(known.threads, len(cpus))
    os.sched_setaffinity(0, cpus[:n])
    return n
