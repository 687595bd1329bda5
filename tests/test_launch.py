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


def test_slurm_script_parses_and_runs_one_task_per_gpu():
    path = os.path.join(LAUNCH, "slurm_multi_gpu.sbatch")
    assert run("bash", "-n", path).returncode == 0
    text = open(path).read()
    assert "#SBATCH --ntasks-per-node=8" in text and "srun" in text
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in text


def test_gke_jobsets_are_valid_yaml_with_one_process_per_host():
    for name, resource in (("gke_tpu_jobset.yaml", "google.com/tpu"), ("gke_gpu_jobset.yaml", "nvidia.com/gpu")):
        doc = yaml.safe_load(open(os.path.join(LAUNCH, name)))
        assert doc["kind"] == "JobSet"
        job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert job["parallelism"] == job["completions"]
        container = job["template"]["spec"]["containers"][0]
        assert resource in container["resources"]["limits"] and "llada-jax pretrain" in " ".join(container["args"])
