"""The launchers: the TPU pod script's dry run, the SLURM script's syntax, the GKE manifests."""

import os
import subprocess

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


def test_slurm_script_starts_each_task_on_its_gpu(tmp_path):
    """Run the sbatch script under a fake `srun` that plays task 9 of 16 (node 2, local id 1): the task must
    activate the venv and run `llada-jax pretrain ARGS` with the script's XLA flags, and the start-up plan
    that llada_jax.distributed makes from the task's SLURM variables must put it on its own GPU."""
    import sys

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
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_multi_gpu.sbatch"), "--config", "c.py",
                           "--output_dir", "/ckpt/run"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().startswith("--kill-on-bad-exit=1 --cpus-per-task=12 bash -c")
    out = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert out["ARGS"] == "pretrain --config c.py --output_dir /ckpt/run"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in out["XLA"]
    # the coordinator on the first node, its port from the job id; process 9 of 16 drives its node's GPU 1
    assert out["PLAN"] == str(dict(coordinator_address=f"gpu007:{61440 + 1234 % 4096}", num_processes=16,
                                   process_id=9, local_device_ids=[1], cluster_detection_method="deactivate"))


def test_gke_jobsets_are_valid_yaml_with_one_process_per_host():
    for name, resource in (("gke_tpu_jobset.yaml", "google.com/tpu"), ("gke_gpu_jobset.yaml", "nvidia.com/gpu")):
        doc = yaml.safe_load(open(os.path.join(LAUNCH, name)))
        assert doc["kind"] == "JobSet"
        job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert job["parallelism"] == job["completions"]
        container = job["template"]["spec"]["containers"][0]
        assert resource in container["resources"]["limits"] and "llada-jax pretrain" in " ".join(container["args"])
