"""Multi-process start-up on JAX's own runtime (`jax.distributed`), before any device is queried.

Sources, first match wins:
  1. explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I`, or the environment
     variables LLADA_JAX_COORDINATOR_ADDRESS / LLADA_JAX_NUM_PROCESSES / LLADA_JAX_PROCESS_ID
     (launch/local_multiprocess.sh, Kubernetes, anything that can set three variables); each process drives
     every device it can see (set CUDA_VISIBLE_DEVICES per process to split a host's GPUs);
  2. SLURM: `srun` with SLURM_NTASKS > 1, one task per node or one per GPU (see `_slurm`);
  3. TPU pods and GKE: the TPU metadata (multi-host TPU VMs, multi-slice, JobSet), or `--distributed` /
     LLADA_JAX_DISTRIBUTED=1 to ask JAX's cluster auto-detection explicitly;
  4. otherwise one process: nothing to do.

`plan` makes that decision as a pure function of the flags and the environment and returns the keyword
arguments of `jax.distributed.initialize` (None: one process); `initialize` calls it.

`heartbeat_timeout` bounds how long the survivors of a crashed process wait: the coordination service
declares a silent peer dead after that many seconds and every process exits with an error instead of
hanging in a collective.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

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


def add_mesh_flag(parser) -> None:
    """`--mesh` of the commands that run a model on a mesh of every device of every process."""
    parser.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,expert=E,tensor=T",
                        help="device mesh over every device of every process: sizes of the data, fsdp, expert and "
                             "tensor axes (one may be -1: the rest); parameters are sharded by the logical-axis "
                             "rules, the batch over data x fsdp x expert. Default: every device on data")


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, distributed: bool = False, heartbeat_timeout: int | None = None,
         environ: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` in this process, or None when it is the only
    process. Pure: reads `environ` (default os.environ) and touches no device."""
    environ = os.environ if environ is None else environ
    coordinator_address = coordinator_address or environ.get(ENV_PREFIX + "COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _int_env(environ, "NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env(environ, "PROCESS_ID")
    heartbeat_timeout = heartbeat_timeout or _int_env(environ, "HEARTBEAT_TIMEOUT")
    extra = {"heartbeat_timeout_seconds": heartbeat_timeout} if heartbeat_timeout else {}
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("multi-process start needs all of coordinator_address, num_processes and process_id "
                             f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
        if num_processes <= 1:
            return None
        # Everything is given: no cluster auto-detection, which would otherwise still pick local_device_ids
        # (under SLURM: one GPU per process). local_device_ids=None: every device this process can see.
        return dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                    local_device_ids=None, cluster_detection_method="deactivate", **extra)
    if _under_slurm(environ):
        return {**_slurm(environ), **extra}
    if distributed or environ.get(ENV_PREFIX + "DISTRIBUTED") == "1" or _on_multihost_tpu(environ):
        return extra
    return None


def _slurm(environ: Mapping[str, str]) -> dict:
    """SLURM, both layouts, without JAX's SLURM auto-detection. That detection always restricts a process to
    GPU ordinal SLURM_LOCALID, which is right only for one task per GPU with all the node's GPUs visible: a
    one-task-per-node process would drive GPU 0 alone, and a task that sees one GPU (ordinal 0) asks for an
    invalid ordinal on local ranks 1-7. So everything is passed explicitly, with the same coordinator JAX
    would choose (first node of the step; port JAX_COORDINATOR_PORT, else derived from the job id):

      - one task on every node (--ntasks-per-node=1): local_device_ids=None, every visible GPU;
      - several tasks per node: task SLURM_LOCALID drives GPU ordinal SLURM_LOCALID of the ones it sees
        (all the node's GPUs visible, `--gpus-per-node`); a task bound to a single GPU by SLURM
        (`--gpus-per-task=1`, `--gpu-bind=single:1`) drives that one.

    Ordinals count the devices CUDA enumerates, after CUDA_VISIBLE_DEVICES; JAX_LOCAL_DEVICE_IDS still
    overrides the choice."""
    ntasks, procid, localid = (int(environ[k]) for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"))
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        # JAX's rule: a port in the ephemeral range [61440, 65535] derived from the job id.
        port = environ.get("JAX_COORDINATOR_PORT") or str(61440 + int(environ["SLURM_JOB_ID"]) % 4096)
        address = f"{_first_host(environ['SLURM_STEP_NODELIST'])}:{port}"
    per_node = _slurm_tasks_per_node(environ)
    visible = _visible_gpu_count(environ)
    if per_node is not None and all(n == 1 for n in per_node):
        devices = None
    elif visible == 1:
        devices = None
    elif visible is not None and localid >= visible:
        raise ValueError(f"SLURM task with local id {localid} sees only {visible} GPUs "
                         f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')}): with several tasks per node "
                         "each needs its own GPU; give every task the node's GPUs (--gpus-per-node) or one each "
                         "(--gpus-per-task=1), or run one task per node")
    else:
        devices = [localid]
    return dict(coordinator_address=address, num_processes=ntasks, process_id=procid, local_device_ids=devices,
                cluster_detection_method="deactivate")


def _under_slurm(environ: Mapping[str, str]) -> bool:
    keys = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return all(k in environ for k in keys) and int(environ["SLURM_NTASKS"]) > 1


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'n1,n2' -> n1; 'gpu[003-010,012],x' -> gpu003."""
    head = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist.strip()).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[", 1)
    return prefix + re.split(r"[,-]", ranges, maxsplit=1)[0]


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> list[int] | None:
    """Tasks on each node of the step: SLURM_STEP_TASKS_PER_NODE (srun), SLURM_TASKS_PER_NODE ('8(x2),4'
    style) or SLURM_NTASKS_PER_NODE; else from SLURM_NTASKS and the node count; None if unknown."""
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(key, "").strip()
        if value:
            counts = []
            for part in value.split(","):
                m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
                if m is None:
                    raise ValueError(f"{key}={value!r}: not a SLURM tasks-per-node list")
                counts += [int(m.group(1))] * int(m.group(2) or 1)
            return counts
    nodes = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    if nodes and int(nodes) > 0 and int(environ["SLURM_NTASKS"]) % int(nodes) == 0:
        return [int(environ["SLURM_NTASKS"]) // int(nodes)] * int(nodes)
    return None


def _visible_gpu_count(environ: Mapping[str, str]) -> int | None:
    """How many GPUs CUDA_VISIBLE_DEVICES leaves this process (indices or UUIDs); None when unset or empty,
    which is not read as 'none': a CPU-only step ignores local_device_ids anyway."""
    value = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return len([d for d in value.split(",") if d.strip()]) if value else None


def _on_multihost_tpu(environ: Mapping[str, str]) -> bool:
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    return bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS")) or "," in hosts


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(ENV_PREFIX + name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"{ENV_PREFIX}{name}={value!r}: expected an integer") from e


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, distributed: bool = False,
               heartbeat_timeout: int | None = None) -> None:
    """Start jax.distributed when this is one process of many; a no-op on a single host. Idempotent."""
    global _initialized
    if _initialized:
        return
    kwargs = plan(coordinator_address, num_processes, process_id, distributed=distributed,
                  heartbeat_timeout=heartbeat_timeout)
    import jax

    if kwargs is not None:
        jax.distributed.initialize(**kwargs)
    _initialized = True
    log.info("process %d of %d: %d local devices of %d (%s)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)


def initialize_from_args(args) -> None:
    initialize(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None), distributed=getattr(args, "distributed", False),
               heartbeat_timeout=getattr(args, "heartbeat_timeout", None))


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


def broadcast(obj):
    """`obj` (JSON-serialisable) of process 0, on every process: process 0 reads the inputs, every process runs
    the model. One process: `obj` as it is."""
    import json

    import jax
    import numpy as np

    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array(data.size, np.int64)))
    buffer = np.zeros(size, np.uint8)
    buffer[:data.size] = data
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def on_main(fn):
    """`fn()` run by process 0 alone, its result (JSON-serialisable) given to every process: the inputs of a
    command are read once. An error of `fn` (an `LLaDAError`) is raised on every process, so that all exit with it
    instead of the others waiting for a result that never comes."""
    import jax

    from llada_jax import errors

    if jax.process_count() == 1:
        return fn()
    outcome = None
    if jax.process_index() == 0:
        try:
            outcome = {"value": fn()}
        except errors.LLaDAError as e:
            outcome = {"error": type(e).__name__, "message": str(e)}
    outcome = broadcast(outcome)
    if "error" in outcome:
        raise getattr(errors, outcome["error"], errors.UsageError)(outcome["message"])
    return outcome["value"]
