"""How a process decides to start jax.distributed (llada_jax/distributed.py), the SLURM launcher, and the
single-process commands' refusal of multi-process runs. jax.distributed.initialize is recorded, not run, except
in the localhost runs at the end, which start real two-process jobs from a simulated SLURM environment."""

import inspect
import json
import os
import socket
import stat
import subprocess
import sys

import jax
import pytest

from llada_jax import distributed
from llada_jax.distributed import plan
from tests.runs import ROOT

SBATCH = os.path.join(ROOT, "launch", "slurm_multi_gpu.sbatch")
EIGHT_GPUS = "0,1,2,3,4,5,6,7"


def slurm(procid, localid, ntasks=16, **extra):
    """The variables srun sets in one task of a 2-node step (job 4242, nodes gpu[003-004])."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": str(ntasks),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_STEP_NUM_NODES": "2", **extra}


SLURM_PORT = str(61440 + 4242 % 4096)


# ---------------------------------------------------------------- explicit flags and LLADA_JAX_* variables

def test_explicit_flags_pass_through_without_auto_detection():
    kwargs = plan("10.0.0.1:1234", 4, 2, environ={})
    assert kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                      "local_device_ids": None, "cluster_detection_method": "deactivate"}
    # explicit flags win over a SLURM environment (whose auto-detection would pin one GPU per process)
    assert plan("10.0.0.1:1234", 4, 2, environ=slurm(5, 5)) == kwargs
    assert plan("h:1", 4, 0, heartbeat_timeout=30, environ={})["heartbeat_timeout_seconds"] == 30


def test_environment_variables_and_flag_precedence():
    env = {"LLADA_JAX_COORDINATOR_ADDRESS": "host0:999", "LLADA_JAX_NUM_PROCESSES": "8",
           "LLADA_JAX_PROCESS_ID": "7", "LLADA_JAX_HEARTBEAT_TIMEOUT": "120"}
    kwargs = plan(environ=env)
    assert (kwargs["coordinator_address"], kwargs["num_processes"], kwargs["process_id"]) == ("host0:999", 8, 7)
    assert kwargs["heartbeat_timeout_seconds"] == 120 and kwargs["cluster_detection_method"] == "deactivate"
    assert plan(None, None, 3, environ=env)["process_id"] == 3  # a flag beats its variable
    assert plan(environ={**env, "LLADA_JAX_NUM_PROCESSES": "1", "LLADA_JAX_PROCESS_ID": "0"}) is None


@pytest.mark.parametrize("given", [("h:1", None, None), (None, 2, 0), ("h:1", 2, None), (None, None, 0)])
def test_a_partial_set_of_explicit_flags_is_a_clear_error(given):
    with pytest.raises(ValueError, match="needs all of coordinator_address, num_processes and process_id"):
        plan(*given, environ={})


def test_partial_or_malformed_variables_are_clear_errors():
    with pytest.raises(ValueError, match="needs all of"):
        plan(environ={"LLADA_JAX_COORDINATOR_ADDRESS": "h:1", "LLADA_JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="LLADA_JAX_PROCESS_ID='one': expected an integer"):
        plan(environ={"LLADA_JAX_COORDINATOR_ADDRESS": "h:1", "LLADA_JAX_NUM_PROCESSES": "2",
                      "LLADA_JAX_PROCESS_ID": "one"})


# ---------------------------------------------------------------- SLURM

def test_slurm_one_task_per_gpu_drives_gpu_localid_of_all_visible():
    env = slurm(11, 3, SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_TASKS_PER_NODE="8(x2)",
                SLURM_NTASKS_PER_NODE="8", CUDA_VISIBLE_DEVICES=EIGHT_GPUS)
    assert plan(environ=env) == {"coordinator_address": f"gpu003:{SLURM_PORT}", "num_processes": 16,
                                 "process_id": 11, "local_device_ids": [3], "cluster_detection_method": "deactivate"}
    # nothing restricts the visible GPUs (no gres binding): still GPU SLURM_LOCALID
    del env["CUDA_VISIBLE_DEVICES"]
    assert plan(environ=env)["local_device_ids"] == [3]


def test_slurm_one_task_per_gpu_bound_by_slurm_drives_the_one_gpu_it_sees():
    # --gpus-per-task=1 (or the old script's CUDA_VISIBLE_DEVICES=$SLURM_LOCALID): the task sees one GPU,
    # ordinal 0; asking for ordinal SLURM_LOCALID (JAX's SLURM default) would be an invalid ordinal
    env = slurm(11, 3, SLURM_STEP_TASKS_PER_NODE="8(x2)", CUDA_VISIBLE_DEVICES="3")
    assert plan(environ=env)["local_device_ids"] is None


def test_slurm_more_tasks_than_visible_gpus_is_a_clear_error():
    env = slurm(3, 3, ntasks=8, SLURM_STEP_TASKS_PER_NODE="4(x2)", CUDA_VISIBLE_DEVICES="0,1")
    with pytest.raises(ValueError, match="local id 3 sees only 2 GPUs"):
        plan(environ=env)


@pytest.mark.parametrize("layout", [{"SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, {"SLURM_TASKS_PER_NODE": "1(x2)"},
                                    {"SLURM_NTASKS_PER_NODE": "1"}, {}])  # {}: 2 tasks on 2 nodes
def test_slurm_one_task_per_node_drives_every_visible_gpu(layout):
    env = slurm(1, 0, ntasks=2, CUDA_VISIBLE_DEVICES=EIGHT_GPUS, **layout)
    assert plan(environ=env) == {"coordinator_address": f"gpu003:{SLURM_PORT}", "num_processes": 2,
                                 "process_id": 1, "local_device_ids": None, "cluster_detection_method": "deactivate"}


def test_slurm_step_layout_wins_over_the_job_layout():
    # a job of 8 tasks per node running a step of one task per node (srun --ntasks-per-node=1)
    env = slurm(1, 0, ntasks=2, SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_TASKS_PER_NODE="8(x2)",
                SLURM_NTASKS_PER_NODE="8")
    assert plan(environ=env)["local_device_ids"] is None
    env = slurm(9, 1, SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_TASKS_PER_NODE="1(x2)")
    assert plan(environ=env)["local_device_ids"] == [1]


def test_slurm_coordinator_is_the_one_jax_would_choose(monkeypatch):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    for nodelist in ("gpu003", "gpu003,gpu004", "gpu[003-004]", "gpu-a[007,009-012],cpu1"):
        env = slurm(0, 0, SLURM_STEP_NODELIST=nodelist, SLURM_NTASKS_PER_NODE="8")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        jax_address = SlurmCluster.get_coordinator_address(timeout_secs=None, override_coordinator_port=None)
        assert plan(environ=env)["coordinator_address"] == jax_address
    env = slurm(0, 0, JAX_COORDINATOR_PORT="2222")
    assert plan(environ=env)["coordinator_address"] == "gpu003:2222"
    env = slurm(0, 0, JAX_COORDINATOR_ADDRESS="10.1.2.3:7000", JAX_COORDINATOR_PORT="2222")
    assert plan(environ=env)["coordinator_address"] == "10.1.2.3:7000"


def test_slurm_needs_a_step_of_several_tasks():
    assert plan(environ=slurm(0, 0, ntasks=1)) is None
    env = slurm(0, 0)
    del env["SLURM_STEP_NODELIST"]  # the batch script itself, outside srun
    assert plan(environ=env) is None


# ---------------------------------------------------------------- TPU pods, auto-detection, one host

@pytest.mark.parametrize("env", [{"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, {"MEGASCALE_COORDINATOR_ADDRESS": "m:1"},
                                 {"LLADA_JAX_DISTRIBUTED": "1"}])
def test_tpu_pods_and_opt_in_use_jax_auto_detection(env):
    assert plan(environ=env) == {}
    assert plan(environ={**env, "LLADA_JAX_HEARTBEAT_TIMEOUT": "60"}) == {"heartbeat_timeout_seconds": 60}


def test_one_host_is_a_no_op():
    assert plan(environ={}) is None
    assert plan(environ={"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM
    assert plan(distributed=True, environ={}) == {}


@pytest.fixture
def recorded(monkeypatch):
    """jax.distributed.initialize replaced by a recorder that checks its arguments against the real signature."""
    calls = []
    signature = inspect.signature(jax.distributed.initialize)

    def record(*args, **kwargs):
        signature.bind(*args, **kwargs)
        calls.append(kwargs)

    monkeypatch.setattr(jax.distributed, "initialize", record)
    monkeypatch.setattr(distributed, "_initialized", False)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "LLADA_JAX_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR")):
            monkeypatch.delenv(key)
    return calls


def test_initialize_passes_the_plan_to_jax(recorded, monkeypatch):
    for key, value in slurm(0, 0, ntasks=2, SLURM_STEP_TASKS_PER_NODE="1(x2)").items():
        monkeypatch.setenv(key, value)
    distributed.initialize(heartbeat_timeout=15)
    distributed.initialize()  # idempotent
    assert recorded == [{"coordinator_address": f"gpu003:{SLURM_PORT}", "num_processes": 2, "process_id": 0,
                         "local_device_ids": None, "cluster_detection_method": "deactivate",
                         "heartbeat_timeout_seconds": 15}]


def test_initialize_on_one_host_does_not_start_jax_distributed(recorded):
    distributed.initialize()
    assert recorded == [] and distributed._initialized


# ---------------------------------------------------------------- single-process commands

def test_inference_starts_jax_distributed_before_loading(recorded, monkeypatch, tmp_path, capsys):
    from llada_jax.cli import main

    code = main(["inference", "--model", str(tmp_path), "--prompt", "x", "--coordinator_address", "h0:1234",
                 "--num_processes", "2", "--process_id", "0", "--heartbeat_timeout", "20"])
    # jax.distributed first (recorded here instead of started), then the model: none in an empty directory
    assert code == 2 and "--model: " in capsys.readouterr().err
    assert recorded == [{"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 0,
                         "local_device_ids": None, "cluster_detection_method": "deactivate",
                         "heartbeat_timeout_seconds": 20}]


# ---------------------------------------------------------------- the SLURM launcher

def fake_cluster(tmp_path):
    """A `srun` that runs its command once (dropping its own options, logging them) and a venv whose
    `llada-jax` prints its arguments and the environment it got."""
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\necho "$@" > "$SRUN_LOG"\n'
                                  'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    (venv_bin / "llada-jax").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))\n")
    for path in (bin_dir / "srun", venv_bin / "llada-jax"):
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_slurm_script_runs_the_command_on_every_task_with_all_gpus_visible(tmp_path):
    bin_dir = fake_cluster(tmp_path)
    env = {**os.environ, **slurm(3, 3, SLURM_CPUS_PER_TASK="12"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "LLADA_VENV": str(tmp_path / "venv"), "SRUN_LOG": str(tmp_path / "srun.log"),
           "CUDA_VISIBLE_DEVICES": EIGHT_GPUS, "XLA_FLAGS": "--xla_dump_to=/tmp/dump"}
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    proc = subprocess.run(["bash", SBATCH, "--config", "configs/llada_8b_pretrain.py", "--output_dir", "/a b"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["argv"] == ["pretrain", "--config", "configs/llada_8b_pretrain.py", "--output_dir", "/a b"]
    assert got["env"]["CUDA_VISIBLE_DEVICES"] == EIGHT_GPUS  # no per-task restriction: distributed.py picks
    assert "--cpus-per-task=12" in (tmp_path / "srun.log").read_text()
    flags = got["env"]["XLA_FLAGS"].split()
    assert flags[0] == "--xla_dump_to=/tmp/dump" and "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert got["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    # the task's own environment now gives one GPU per task: GPU SLURM_LOCALID of the eight
    assert plan(environ={**got["env"], "SLURM_STEP_TASKS_PER_NODE": "8(x2)"})["local_device_ids"] == [3]
    # every XLA flag the script sets is known to the installed jaxlib (XLA aborts on an unknown one)
    check = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(jnp.ones(2).sum())"],
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags[1:])},
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "2.0", check.stderr[-2000:]


# ---------------------------------------------------------------- real jax.distributed from a SLURM environment

PROBE = ("from llada_jax import distributed; distributed.initialize(); import jax, json; "
         "print(json.dumps([jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()]))")


@pytest.mark.parametrize("tasks_per_node, localids", [("2", (0, 1)), ("1(x2)", (0, 0))],
                         ids=["one_task_per_gpu", "one_task_per_node"])
def test_two_processes_start_from_a_slurm_environment(tasks_per_node, localids):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LLADA_JAX_", "JAX_COORDINATOR"))}
    procs = []
    for procid, localid in enumerate(localids):
        env = {**base, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_COORDINATOR_PORT": port,
               "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
               "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_STEP_TASKS_PER_NODE": tasks_per_node}
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results == [[0, 2, 2, 4], [1, 2, 2, 4]]
