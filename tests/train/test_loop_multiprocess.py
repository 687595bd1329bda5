"""Real multi-process runs on localhost (jax.distributed, gloo collectives) through launch/local_multiprocess.sh."""

import json
import os
import time

import numpy as np

from llada_jax.train.metrics import read_metrics
from tests.runs import TINY, cli, launch


def run_args(data, out, steps, *extra):
    return ["pretrain", "--config", TINY, "--data_path", data, "--output_dir", out, "--max_steps", str(steps),
            "--batch_size", "8", "--max_length", "32", "--save_steps", "3", "--logging_steps", "1",
            "--warmup_steps", "2", "--config.checkpoint.async_save=false", *extra]


def rows(run):
    return [(m["step"], m["loss"], m["batch_checksum"]) for m in read_metrics(run)]


def test_a_run_moves_between_process_counts_and_sees_the_same_data(tmp_path, pretrain_data):
    """The default data order depends on (data, seed, step) alone: a run checkpointed by 2 processes resumes in
    1 process (on another mesh), and that one's checkpoint in 2 processes again, and every step trains on the
    batches of the uninterrupted 1-process run, with its losses."""
    one, moved = str(tmp_path / "one_process"), str(tmp_path / "moved")
    cli(*run_args(pretrain_data, one, 9), devices=4)
    proc = launch(2, 2, *run_args(pretrain_data, moved, 9), kill=(3,))  # both processes stop after saving step 3
    assert proc.returncode != 0 and "process 1 of 2: 2 local devices of 4" in proc.stderr, proc.stderr[-3000:]
    assert [s for s, _, _ in rows(moved)] == [1, 2, 3]
    # 2 processes -> 1 process on another mesh (8 devices, fsdp 4 x tensor 2), stopped after step 6
    proc = cli(*run_args(pretrain_data, moved, 9, "--config.mesh.tensor=2"), devices=8, kill_after_step=6,
               check=False)
    assert proc.returncode == -9 and "resumed from" in proc.stderr and "step 3" in proc.stderr
    # 1 process -> 2 processes, to the end
    proc = launch(2, 2, *run_args(pretrain_data, moved, 9))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = rows(moved), rows(one)
    assert [s for s, _, _ in a] == list(range(1, 10))  # process 0 alone writes metrics: no duplicates
    assert [c for _, _, c in a] == [c for _, _, c in b]  # the same global batches, step by step
    # other meshes and process counts: equal up to float32 reduction order
    np.testing.assert_allclose([l for _, l, _ in a], [l for _, l, _ in b], rtol=1e-4)


def test_a_killed_process_makes_its_peer_exit_with_an_error(tmp_path, pretrain_data):
    out = str(tmp_path / "killed")
    start = time.monotonic()
    # a hybrid mesh (mesh.dcn_data 2: the data axis across the two processes), whose gradient all-reduce
    # is the collective process 0 would wait in
    proc = launch(2, 1, *run_args(pretrain_data, out, 50, "--config.mesh.dcn_data=2"),
                  kill=(2, 1), timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    # process 1 was killed after step 2; process 0 must not hang in its next collective: the coordination
    # service's heartbeat (10 s here) ends it with an error
    assert elapsed < 120, elapsed
    logged = read_metrics(out)
    # step 1 is logged before process 0 starts step 2, which process 1 must join before it is killed
    assert 1 <= len(logged) <= 3 and all(np.isfinite(m["loss"]) for m in logged)  # the hybrid mesh trained
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["mesh"]["dcn_data"] == 2
