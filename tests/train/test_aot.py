"""compile-check: the train step, and the sampler, compiled ahead of time for N fake devices."""

import json
import os

from tests.runs import ROOT, cli


def test_compile_check_sizes_the_8b_model_on_8_devices(tmp_path):
    report = tmp_path / "report.json"
    proc = cli("compile-check", "--config", os.path.join(ROOT, "configs", "llada_8b_pretrain.py"),
               "--num_devices", "8", "--json", str(report), devices=1)
    r = json.loads(report.read_text())
    assert r["devices"] == 8 and r["parameters"] == 8_015_581_184
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # fp32 params + two Adam moments, sharded 8 ways: 12 bytes x 8.0e9 / 8 = 12.0 GB per device
    assert abs(r["argument_bytes"] - 12 * 8_015_581_184 / 8) / r["argument_bytes"] < 0.02
    assert r["temp_bytes"] > 0 and "per-device memory" in proc.stdout


def test_compile_check_sizes_the_8b_sampler_on_8_devices(tmp_path):
    """LLaDA-8B in bf16 with tensor=8: each device holds an eighth of the 16 GB of weights, and the whole sampler
    (prompt 512, 256 generated, batch 8) fits a 16 GB chip; with every device on data it does not."""
    common = ["compile-check", "--sample", "--num_devices", "8", "--model", "llada_8b", "--dtype", "bfloat16",
              "--batch_size", "8", "--prompt_length", "512", "--gen_length", "256", "--block_length", "32",
              "--steps", "256"]
    reports = {}
    for mesh in ("tensor=8", "data=8"):
        out = tmp_path / f"{mesh}.json"
        proc = cli(*common, "--mesh", mesh, "--json", str(out), devices=1)
        assert "per-device memory" in proc.stdout
        reports[mesh] = json.loads(out.read_text())
    tp = reports["tensor=8"]
    assert tp["parameters"] == 8_015_581_184 and tp["mesh"] == {"data": 1, "fsdp": 1, "tensor": 8}
    assert abs(tp["argument_bytes"] - 2 * 8_015_581_184 / 8) / tp["argument_bytes"] < 0.02  # bf16 / 8
    assert tp["peak_bytes_estimate"] < 16 * 1024**3
    # no float32 copy of the weights held across the loops (the CPU compiler's bf16 matmul artefact, removed)
    assert tp["temp_bytes"] < 0.5 * tp["argument_bytes"]
    replicated = reports["data=8"]
    assert abs(replicated["argument_bytes"] - 2 * 8_015_581_184) / replicated["argument_bytes"] < 0.02
    assert replicated["peak_bytes_estimate"] > 16 * 1024**3
    assert replicated["temp_bytes"] < 0.1 * replicated["argument_bytes"]
