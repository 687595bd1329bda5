"""Running the `llada-jax` command in a subprocess, and a small pretraining corpus."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_pretrain.py")


def command(kill_after_step: int | None = None, process: int | None = None, *, module: str = "llada_jax"
            ) -> list[str]:
    """The `llada-jax` command line (or `python -m module`); with `kill_after_step`, one whose process (or only
    process `process`) kills itself after that training step (tests/fault.py)."""
    if kill_after_step is None:
        return [sys.executable, "-m", module]
    return [sys.executable, "-m", "tests.fault", str(kill_after_step)] + ([] if process is None else [str(process)]) + [
        "--"]


# What llada_jax.checkpoints.storage derives from STORAGE_EMULATOR_HOST: left out of the commands' environment,
# so that they show the one variable is all a user sets.
DERIVED_FROM_EMULATOR_HOST = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                              "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def environment(**extra) -> dict:
    """The environment of a command the tests start: this one's, without what the package derives itself."""
    return {**{k: v for k, v in os.environ.items() if k not in DERIVED_FROM_EMULATOR_HOST}, "PYTHONPATH": ROOT,
            **extra}


def cli(*args, env=None, devices=8, check=True, kill_after_step=None, module="llada_jax"):
    full_env = environment(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                           **(env or {}))
    proc = subprocess.run([*command(kill_after_step, module=module), *args], env=full_env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_pretrain_data(path):
    """Pre-tokenized documents of varying length over the tiny vocabulary (no special tokens)."""
    rs = np.random.RandomState(0)
    with open(path, "w") as f:
        for _ in range(300):
            n = rs.randint(5, 60)
            start = rs.randint(0, 400)
            doc = [(start + 3 * i) % 500 for i in range(n)]  # learnable arithmetic progressions
            f.write(json.dumps({"input_ids": doc}) + "\n")
    return str(path)


LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")


def launch(n, devices, *args, env=None, timeout=600, kill=None, module="llada_jax"):
    """`llada-jax ARGS` as n processes of `devices` devices; `kill` = (step, process) kills that process after
    that training step."""
    full_env = environment(**(env or {}))
    full_env.pop("XLA_FLAGS", None)  # the launcher sets the per-process device count
    return subprocess.run([LAUNCH, "--devices_per_process", str(devices), "--heartbeat_timeout", "10", str(n), "--",
                           *command(*(kill or ()), module=module), *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
