"""`sample` and `eval-likelihood` on a mesh of several processes (launch/local_multiprocess.sh, gloo collectives):
the outputs do not depend on the layout; a dead process ends the others; bad meshes are one error before
loading; stdin / stdout."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.runs import ROOT, cli, environment, launch
from tests.sampling.test_cli import RECORDS, write_jsonl

FLAGS = ["--gen_length", "8", "--block_length", "4", "--steps", "4", "--batch_size", "2", "--no_progress"]
LAYOUTS = {"1 process x 1 device": (1, 1, None), "1 process x 4 devices": (1, 4, None),
           "2 processes x 2 devices, data=2 tensor=2": (2, 2, "data=2,tensor=2")}


def run_layout(layout, *args):
    processes, devices, mesh = LAYOUTS[layout]
    args = [*args, *(["--mesh", mesh] if mesh else [])]
    if processes == 1:
        return cli(*args, devices=devices)
    proc = launch(processes, devices, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--remasking_strategy", "random"]],
                         ids=["greedy", "temperature"])
def test_sample_lines_do_not_depend_on_the_process_layout(saved, tmp_path, sampling):
    run_dir = saved[0]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    outputs = {}
    for i, layout in enumerate(LAYOUTS):
        out = tmp_path / f"out{i}.jsonl"
        run_layout(layout, "sample", "--model", run_dir, "--input", prompts, "--output", str(out), *FLAGS, *sampling)
        outputs[layout] = out.read_text()
    first = next(iter(outputs.values()))
    assert len(first.splitlines()) == len(RECORDS)
    for layout, text in outputs.items():
        assert text == first, layout  # the same lines, whole and in input order, written once (by process 0)
    # --resume in 2 processes continues a partial output to the same lines
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(first.splitlines(keepends=True)[:2]))
    run_layout("2 processes x 2 devices, data=2 tensor=2", "sample", "--model", run_dir, "--input", prompts,
               "--output", str(partial), "--resume", *FLAGS, *sampling)
    assert partial.read_text() == first


def test_eval_likelihood_values_do_not_depend_on_the_process_layout(saved, tmp_path):
    run_dir = saved[0]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": i, "prompt_ids": list(range(3 + i, 9 + i)), "answer_ids": list(range(20, 23 + i))} for i in range(5)])
    values = {}
    for i, layout in enumerate(LAYOUTS):
        out = tmp_path / f"ll{i}.jsonl"
        run_layout(layout, "eval-likelihood", "--model", run_dir, "--input", pairs, "--output", str(out),
                   "--mc_num", "8", "--batch_size", "4", "--examples_per_call", "2", "--greedy")
        values[layout] = [json.loads(line) for line in out.read_text().splitlines()]
    first = next(iter(values.values()))
    assert [r["id"] for r in first] == list(range(5))
    for layout, rows in values.items():  # float32 sums in another order (tensor parallel): equal to 1e-5
        np.testing.assert_allclose([r["log_likelihood"] for r in rows], [r["log_likelihood"] for r in first],
                                   rtol=1e-5, err_msg=layout)
        assert [r["greedy"] for r in rows] == [r["greedy"] for r in first], layout


def test_a_killed_process_makes_its_peer_exit_with_an_error_and_resume_completes(saved, tmp_path):
    run_dir = saved[0]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    expected = tmp_path / "expected.jsonl"
    cli("sample", "--model", run_dir, "--input", prompts, "--output", str(expected), *FLAGS, devices=1)
    out = tmp_path / "out.jsonl"
    args = ["sample", "--model", run_dir, "--input", prompts, "--output", str(out), *FLAGS]
    start = time.monotonic()
    proc = launch(2, 2, *args, "--mesh", "data=2,tensor=2", kill=(1, 1), timeout=300)  # process 1 dies after its first batch of three
    elapsed = time.monotonic() - start
    # process 0 does not hang in the next collective: the coordination service's heartbeat (10 s) ends it
    assert proc.returncode != 0 and elapsed < 120, (elapsed, proc.stderr[-2000:])
    written = out.read_text() if out.exists() else ""
    assert expected.read_text().startswith(written) and len(written.splitlines()) < len(RECORDS)  # whole lines
    run_layout("2 processes x 2 devices, data=2 tensor=2", *args, "--resume")
    assert out.read_text() == expected.read_text()


@pytest.mark.parametrize("mesh,devices,message", [
    ("tensor=3", 4, "the fixed axes (3 devices) do not divide the 4 devices"),
    ("tensor=8", 8, "mesh tensor=8 does not divide the model's 4 attention heads"),
    ("data=2,pipeline=2", 4, "--mesh: expected data=D,fsdp=F,expert=E,tensor=T"),
])
def test_a_mesh_that_does_not_fit_is_one_error_before_loading(saved, tmp_path, mesh, devices, message):
    proc = cli("sample", "--model", saved[0], "--input", write_jsonl(tmp_path / "p.jsonl", RECORDS), "--output",
               str(tmp_path / "o.jsonl"), "--mesh", mesh, *FLAGS, devices=devices, check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not (tmp_path / "o.jsonl").exists()


def test_standard_input_and_output_and_process_substitution(saved, tmp_path):
    run_dir = saved[0]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    cli("sample", "--model", run_dir, "--input", prompts, "--output", str(tmp_path / "file.jsonl"), *FLAGS)
    expected = (tmp_path / "file.jsonl").read_text()
    env = environment(JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "llada_jax", "sample", "--model", run_dir, "--input", "-",
                           "--output", "-", *FLAGS], input=open(prompts).read(), capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout == expected, proc.stderr[-2000:]  # logs went to stderr
    command = " ".join([sys.executable, "-m", "llada_jax", "sample", "--model", run_dir, "--input",
                        f"<(cat {prompts})", "--output", "-", *FLAGS])
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout == expected, proc.stderr[-2000:]
