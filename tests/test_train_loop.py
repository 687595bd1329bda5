"""`llada-jax pretrain` / `sft` end to end: resume exactness, other meshes, the guard, the CLI's errors."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from llada_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_pretrain.py")


def cli(*args, env=None, devices=8, check=True):
    full_env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "llada_jax", *args], env=full_env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    """Pre-tokenized documents of varying length over the tiny vocabulary (no special tokens)."""
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    rs = np.random.RandomState(0)
    with open(path, "w") as f:
        for _ in range(300):
            n = rs.randint(5, 60)
            start = rs.randint(0, 400)
            doc = [(start + 3 * i) % 500 for i in range(n)]  # learnable arithmetic progressions
            f.write(json.dumps({"input_ids": doc}) + "\n")
    return str(path)


def common(data, out, steps, *extra):
    return ["pretrain", "--config", TINY, "--data_path", data, "--output_dir", out, "--max_steps", str(steps),
            "--batch_size", "8", "--max_length", "32", "--save_steps", "10", "--logging_steps", "1",
            "--warmup_steps", "5", "--config.checkpoint.async_save=false", *extra]


def losses(run):
    return [(m["step"], m["loss"], m["batch_checksum"]) for m in read_metrics(run)]


def test_resume_after_a_kill_is_bitwise_identical(tmp_path, pretrain_data):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    cli(*common(pretrain_data, straight, 30))
    killed = cli(*common(pretrain_data, resumed, 30), env={"LLADA_JAX_FAULT_AFTER_STEP": "15"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints")))[-1] == "10"
    cli(*common(pretrain_data, resumed, 30))  # the same command again: resumes from step 10
    a, b = losses(straight), losses(resumed)
    assert [s for s, _, _ in b] == list(range(1, 31))
    assert a == b  # same losses bit for bit, and the same data (checksums) in the same order
    first, last = np.mean([l for _, l, _ in a[:5]]), np.mean([l for _, l, _ in a[-5:]])
    assert last < first, (first, last)  # and it learns


def test_continue_a_finished_run_with_more_steps_and_on_another_mesh(tmp_path, pretrain_data):
    same, other = str(tmp_path / "same_mesh"), str(tmp_path / "other_mesh")
    cli(*common(pretrain_data, same, 10, "--config.mesh.fsdp=4", "--config.mesh.tensor=2"))
    done = cli(*common(pretrain_data, same, 10))
    assert "nothing to do" in done.stderr
    shutil.copytree(same, other)
    # a larger max_steps continues the finished run: on the same 8-device mesh, and on 4 devices laid out
    # differently (parameters, optimizer moments and the data position restored onto the new mesh)
    cli(*common(pretrain_data, same, 12, "--config.mesh.fsdp=4", "--config.mesh.tensor=2"))
    cli(*common(pretrain_data, other, 12, "--config.mesh.data=2", "--config.mesh.fsdp=-1"), devices=4)
    a, b = losses(same), losses(other)
    assert [s for s, _, _ in b] == list(range(1, 13))
    assert a[:10] == b[:10] and [c for _, _, c in a] == [c for _, _, c in b]
    # steps 11-12 ran on different meshes: equal up to float32 reduction order
    np.testing.assert_allclose([l for _, l, _ in b[10:]], [l for _, l, _ in a[10:]], rtol=1e-4)


def test_nonfinite_guard_stops_the_run(tmp_path, pretrain_data):
    out = str(tmp_path / "diverge")
    proc = cli(*common(pretrain_data, out, 30, "--learning_rate", "1e30", "--config.max_consecutive_nonfinite=3",
                       "--warmup_steps", "0"), check=False)
    assert proc.returncode == 1
    assert "consecutive steps had a non-finite loss or gradient" in proc.stderr
    logged = read_metrics(out)
    assert logged[-1]["skipped_updates"] >= 3


@pytest.mark.parametrize("args,message", [
    (["--config.mesh.tensor=3"], "do not divide the 8 devices"),
    (["--batch_size", "6", "--config.mesh.fsdp=8"], "batch_size 6 is not divisible by the 8 data-parallel shards"),
    (["--config.learning_rat=1"], "unknown config key 'learning_rat'"),
    (["--max_steps", "0"], "max_steps must be a positive integer"),
])
def test_cli_errors_before_any_work(tmp_path, pretrain_data, args, message):
    out = tmp_path / "never"
    proc = cli(*common(pretrain_data, str(out), 5)[:-1], *args, check=False)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]  # one line (after the start-up log line), no traceback
    assert error.startswith("llada-jax pretrain: error: ") and message in error
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_data_and_unknown_flag(tmp_path):
    proc = cli("pretrain", "--config", TINY, "--data_path", str(tmp_path / "none.jsonl"), "--output_dir",
               str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = cli("pretrain", "--config", TINY, "--data-path", "x", check=False)
    assert proc.returncode == 2 and "unrecognized argument '--data-path'" in proc.stderr


def test_create_configs_round_trip(tmp_path, pretrain_data):
    cli("create-configs", "--output_dir", str(tmp_path))
    from llada_jax.config import load_config

    pre = load_config(str(tmp_path / "pretraining_config.json"), task="pretrain")
    sft = load_config(str(tmp_path / "sft_config.json"), task="sft")
    assert (pre.learning_rate, pre.batch_size, pre.gradient_accumulation_steps) == (5e-4, 8, 8)
    assert (sft.learning_rate, sft.batch_size, sft.gradient_accumulation_steps) == (1e-5, 4, 16)
    assert pre.model.d_model == 4096 and pre.model.mask_token_id == 126336
