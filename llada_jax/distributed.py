"""Multi-process start-up on JAX's own runtime (`jax.distributed`), before any device is queried.

Sources, first match wins:
  1. explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I`, or the environment
     variables LLADA_JAX_COORDINATOR_ADDRESS / LLADA_JAX_NUM_PROCESSES / LLADA_JAX_PROCESS_ID
     (launch/local_multiprocess.sh, Kubernetes, anything that can set three variables);
  2. SLURM: one task per node or per GPU under `srun` (SLURM_NTASKS > 1); JAX reads the SLURM variables;
  3. TPU pods and GKE: the TPU metadata (multi-host TPU VMs, multi-slice, JobSet), or `--distributed` /
     LLADA_JAX_DISTRIBUTED=1 to ask JAX's cluster auto-detection explicitly;
  4. otherwise one process: nothing to do.

`heartbeat_timeout` bounds how long the survivors of a crashed process wait: the coordination service
declares a silent peer dead after that many seconds and every process exits with an error instead of
hanging in a collective.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("llada_jax")

ENV_PREFIX = "LLADA_JAX_"
_initialized = False


def add_flags(parser) -> None:
    """The distributed flags every model-running command accepts (argparse; imports nothing heavy)."""
    g = parser.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0's coordination service")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with cluster auto-detection (TPU pods, GKE, SLURM)")
    g.add_argument("--heartbeat_timeout", type=int, default=None,
                   help="seconds after which a silent process is declared dead (default: JAX's, 100)")


def _env(name: str):
    return os.environ.get(ENV_PREFIX + name)


def _on_multihost_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")) or "," in hosts


def _under_slurm() -> bool:
    keys = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return all(k in os.environ for k in keys) and int(os.environ["SLURM_NTASKS"]) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, distributed: bool = False,
               heartbeat_timeout: int | None = None) -> None:
    """Start jax.distributed when this is one process of many; a no-op on a single host. Idempotent."""
    global _initialized
    if _initialized:
        return
    import jax

    coordinator_address = coordinator_address or _env("COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _int_env("NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("PROCESS_ID")
    heartbeat_timeout = heartbeat_timeout or _int_env("HEARTBEAT_TIMEOUT")
    extra = {"heartbeat_timeout_seconds": heartbeat_timeout} if heartbeat_timeout else {}
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("multi-process start needs all of coordinator_address, num_processes and process_id "
                             f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
        if num_processes > 1:
            jax.distributed.initialize(coordinator_address, num_processes, process_id, **extra)
    elif _under_slurm():
        jax.distributed.initialize(cluster_detection_method="slurm", **extra)
    elif distributed or os.environ.get(ENV_PREFIX + "DISTRIBUTED") == "1" or _on_multihost_tpu():
        jax.distributed.initialize(**extra)
    _initialized = True
    log.info("process %d of %d: %d local devices of %d (%s)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)


def initialize_from_args(args) -> None:
    initialize(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None), distributed=getattr(args, "distributed", False),
               heartbeat_timeout=getattr(args, "heartbeat_timeout", None))


def _int_env(name: str) -> int | None:
    value = _env(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"{ENV_PREFIX}{name}={value!r}: expected an integer") from e


def start(args) -> None:
    """Process start-up of every model-running command: logging, then jax.distributed (before any device
    query), then INFO logs on process 0 only."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    if not log.handlers:  # the project's own handler: absl owns the root logger's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)
    initialize_from_args(args)
    import jax

    if jax.process_index() != 0:
        log.setLevel(logging.WARNING)
