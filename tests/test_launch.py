"""The launchers: the TPU pod script's dry run, the local multi-process script's devices, the SLURM script's task
start-up and XLA flags, the GKE manifests."""

import os
import subprocess
import sys

import pytest
import yaml

from tests.runs import ROOT

LAUNCH = os.path.join(ROOT, "launch")


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def test_tpu_pod_dry_run_prints_every_step_on_all_workers():
    proc = run(os.path.join(LAUNCH, "tpu_pod.sh"), "--tpu", "pod1", "--zone", "us-central2-b", "--create",
               "--accelerator_type", "v4-32", "--version", "tpu-ubuntu2204-base", "--dry_run", "--",
               "llada-jax", "pretrain", "--config", "configs/llada_8b_pretrain.py", "--output_dir", "/mnt/ckpt/run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create pod1 --zone us-central2-b --accelerator-type v4-32")
    ssh = [line for line in lines if " ssh pod1 " in line]
    assert len(ssh) == 3 and all("--worker=all" in line for line in ssh)  # unpack, install, run
    assert "LLADA_JAX_DISTRIBUTED=1" in ssh[-1] and "llada-jax\\ pretrain" in ssh[-1]
    assert any(" scp " in line and "--worker=all" in line for line in lines)


def test_tpu_pod_requires_its_arguments():
    proc = run(os.path.join(LAUNCH, "tpu_pod.sh"), "--zone", "z", "--", "llada-jax", "pretrain")
    assert proc.returncode == 2 and "--tpu and --zone are required" in proc.stderr
    proc = run(os.path.join(LAUNCH, "tpu_pod.sh"), "--tpu", "t", "--zone", "z", "--create", "--", "x")
    assert proc.returncode == 2 and "--create needs --accelerator_type and --version" in proc.stderr


def test_local_launcher_rejects_a_bad_process_count():
    proc = run(os.path.join(LAUNCH, "local_multiprocess.sh"), "zero", "--", "true")
    assert proc.returncode == 2 and "N must be a positive integer" in proc.stderr


PRINT_DEVICES = [sys.executable, "-c", "import jax; print(jax.local_device_count())"]


def local_launch(*args, xla_flags=None):
    """Run launch/local_multiprocess.sh ARGS with XLA_FLAGS set to `xla_flags` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest sets 8 devices for the tests
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run([os.path.join(LAUNCH, "local_multiprocess.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**env, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("xla_flags, options, n, want", [
    (None, [], 1, 1),  # the default: one device a process
    (None, ["--devices_per_process", "3"], 1, 3),
    ("--xla_force_host_platform_device_count=2", [], 2, 2),  # the user's count is kept (issue 28: it got 1)
    ("--xla_force_host_platform_device_count=2", ["--devices_per_process", "2"], 1, 2),
])
def test_local_launcher_gives_each_process_its_device_count(xla_flags, options, n, want):
    proc = local_launch(*options, str(n), "--", *PRINT_DEVICES, xla_flags=xla_flags)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [f"[process {i}] {want}" for i in range(n)], proc.stdout


def test_local_launcher_refuses_two_device_counts():
    proc = local_launch("--devices_per_process", "4", "2", "--", "true",
                        xla_flags="--xla_force_host_platform_device_count=2")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.count("\n") == 1 and "--devices_per_process 4 conflicts with " \
        "--xla_force_host_platform_device_count=2 in XLA_FLAGS" in proc.stderr, proc.stderr


def run_slurm_script(tmp_path, **env_vars):
    """Run the sbatch script under a fake `srun` that plays task 9 of 16 (node 2, local id 1), its
    `llada-jax` a fake that prints its arguments, XLA_FLAGS and the start-up plan of llada_jax.distributed:
    ({"ARGS": ..., "XLA": ..., "PLAN": ...}, srun's arguments)."""
    fake_bin, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake_bin.mkdir()
    log = tmp_path / "srun_args"
    (fake_bin / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" > {log}\n'
        'while [[ "$1" == --* ]]; do shift; done\n'  # srun's own options
        "SLURM_PROCID=9 SLURM_LOCALID=1 SLURM_NODEID=1 SLURM_STEP_TASKS_PER_NODE='8(x2)' \"$@\"\n")
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    (venv / "bin" / "llada-jax").write_text(
        "#!/usr/bin/env bash\n"
        'echo "ARGS $*"\necho "XLA $XLA_FLAGS"\n'
        f"exec {sys.executable} -c 'from llada_jax.distributed import plan; print(\"PLAN\", plan())'\n")
    for f in (fake_bin / "srun", venv / "bin" / "llada-jax"):
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "LLADA_VENV": str(venv), "PYTHONPATH": ROOT,
           "SLURM_JOB_ID": "1234", "SLURM_NTASKS": "16", "SLURM_CPUS_PER_TASK": "12",
           "SLURM_STEP_NODELIST": "gpu[007-008]"}
    for name in ("CUDA_VISIBLE_DEVICES", "XLA_FLAGS"):
        env.pop(name, None)
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_multi_gpu.sbatch"), "--config", "c.py",
                           "--output_dir", "/ckpt/run"], env={**env, **env_vars}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines()), log.read_text()


def test_slurm_script_starts_each_task_on_its_gpu(tmp_path):
    """The task activates the venv and runs `llada-jax pretrain ARGS` with the script's XLA flags, and the
    start-up plan that llada_jax.distributed makes from the task's SLURM variables puts it on its own GPU."""
    out, srun_args = run_slurm_script(tmp_path)
    assert srun_args.startswith("--kill-on-bad-exit=1 --cpus-per-task=12 bash -c")
    assert out["ARGS"] == "pretrain --config c.py --output_dir /ckpt/run"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in out["XLA"]
    # the coordinator on the first node, its port from the job id; process 9 of 16 drives its node's GPU 1
    assert out["PLAN"] == str(dict(coordinator_address=f"gpu007:{61440 + 1234 % 4096}", num_processes=16,
                                   process_id=9, local_device_ids=[1], cluster_detection_method="deactivate"))


def test_slurm_script_keeps_the_xla_flags_the_user_set(tmp_path):
    """A flag already in XLA_FLAGS is not overridden by the script's value of it (XLA takes the last of repeated
    flags: appended, the script's would win); the script's other flags are still added."""
    user = "--xla_gpu_all_gather_combine_threshold_bytes=8589934592 --xla_gpu_enable_while_loop_double_buffering=false"
    out, _ = run_slurm_script(tmp_path, XLA_FLAGS=user)
    flags = out["XLA"].split()
    assert flags[:2] == user.split()
    for name in ("xla_gpu_all_gather_combine_threshold_bytes", "xla_gpu_enable_while_loop_double_buffering"):
        assert sum(f.startswith(f"--{name}=") for f in flags) == 1, flags
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728" in flags


def test_gke_jobsets_are_valid_yaml_with_one_process_per_host():
    for name, resource in (("gke_tpu_jobset.yaml", "google.com/tpu"), ("gke_gpu_jobset.yaml", "nvidia.com/gpu")):
        doc = yaml.safe_load(open(os.path.join(LAUNCH, name)))
        assert doc["kind"] == "JobSet"
        job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert job["parallelism"] == job["completions"]
        container = job["template"]["spec"]["containers"][0]
        assert resource in container["resources"]["limits"] and "llada-jax pretrain" in " ".join(container["args"])

