"""`llada-jax pretrain` / `sft` of a Mixture-of-Experts model (the tiny LLaDA 2.x network, 8 experts): it learns
(bidirectional pretraining, block-causal SFT), logs the experts' balance, gives the one-device losses on an expert
mesh, and a mesh that does not fit the experts is one line before anything is written."""

import json
import os
import random

import numpy as np
import pytest

from llada_jax.train.metrics import read_metrics
from tests.runs import ROOT, TINY, cli

PRETRAIN = f"{TINY}:tiny_moe"
SFT = os.path.join(ROOT, "configs", "tiny_sft.py:tiny_moe")
STEPS = 60


def pretrain(data, out, *extra, steps=STEPS, devices=1, **kwargs):
    return cli("pretrain", "--config", PRETRAIN, "--data_path", data, "--output_dir", out, "--max_steps", str(steps),
               "--batch_size", "8", "--max_length", "32", "--logging_steps", "1", "--warmup_steps", "5",
               "--save_steps", str(steps), "--config.checkpoint.async_save=false", *extra, devices=devices, **kwargs)


def write_sort_task(path):
    """Sort four digits: BOS d1..d4 SEP sorted EOS, the prompt the first 6 tokens (the tiny preset's ids)."""
    rs = random.Random(0)
    with open(path, "w") as f:
        for _ in range(500):
            x = [rs.randrange(10) for _ in range(4)]
            f.write(json.dumps({"input_ids": [509] + [10 + d for d in x] + [20] + [10 + d for d in sorted(x)] + [510],
                                "prompt_length": 6}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrain_data):
    root = tmp_path_factory.mktemp("moe_training")
    pretrain(pretrain_data, str(root / "pretrain"))
    cli("sft", "--config", SFT, "--data_path", write_sort_task(root / "sort.jsonl"), "--output_dir", str(root / "sft"),
        "--max_steps", str(STEPS), "--batch_size", "8", "--max_length", "16", "--logging_steps", "1",
        "--warmup_steps", "5", "--save_steps", str(STEPS), "--learning_rate", "1e-3",
        "--config.model.attention_type=block_causal", "--config.model.block_size=4",
        "--config.checkpoint.async_save=false", devices=1)
    return {"root": root, "pretrain": str(root / "pretrain"), "sft": str(root / "sft")}


@pytest.mark.parametrize("run", ["pretrain", "sft"])
def test_a_moe_model_learns_and_logs_the_experts_balance(runs, run):
    rows = read_metrics(runs[run])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses  # it learns (measured: 0.65, 0.22)
    for r in rows:
        # 8 experts, 2 chosen per token: the busiest expert gets 1 (balanced) to 4 (every token) times the mean
        assert 1 <= r["moe_max_over_mean_load"] <= 4 and 0 <= r["moe_unused_experts"] < 1, r
    config = json.load(open(os.path.join(runs[run], "config.json")))["model"]
    assert (config["num_experts"], config["attention_type"]) == (8, "block_causal" if run == "sft" else "bidirectional")


def test_an_expert_mesh_gives_the_one_device_losses(runs, pretrain_data):
    """8 devices, the experts split 4 ways (and the batch over fsdp x expert): the first steps' losses of the
    one-device run, up to float32 reduction order."""
    out = str(runs["root"] / "expert4")
    proc = pretrain(pretrain_data, out, "--config.mesh.fsdp=2", "--config.mesh.expert=4", steps=5, devices=8)
    assert "8 local devices of 8" in proc.stderr
    one = [r["loss"] for r in read_metrics(runs["pretrain"])][:5]
    np.testing.assert_allclose([r["loss"] for r in read_metrics(out)], one, rtol=1e-4)


@pytest.mark.parametrize("config,mesh,devices,message", [
    (PRETRAIN, "--config.mesh.expert=3", 6, "mesh expert=3 does not divide the model's 8 experts (num_experts)"),
    (PRETRAIN, "--config.mesh.expert=3", 8, "'expert': 3, 'tensor': 1}: the fixed axes (3 devices) do not divide"),
    (TINY, "--config.mesh.expert=2", 8, "mesh expert=2: the model has no experts (num_experts is 0)"),
], ids=["experts", "devices", "dense"])
def test_a_mesh_that_does_not_fit_the_experts_is_one_line_before_any_work(tmp_path, pretrain_data, config, mesh,
                                                                        devices, message):
    out = tmp_path / "never"
    proc = cli("pretrain", "--config", config, "--data_path", pretrain_data, "--output_dir", str(out), mesh,
               devices=devices, check=False)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("llada-jax pretrain: error: ") and message in error, error
    assert "Traceback" not in proc.stderr and not out.exists()
