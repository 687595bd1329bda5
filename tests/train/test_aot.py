"""compile-check: the train step compiled ahead of time for N fake devices."""

import os

from tests.runs import ROOT, cli


def test_compile_check_sizes_the_8b_model_on_8_devices(tmp_path):
    report = tmp_path / "report.json"
    proc = cli("compile-check", "--config", os.path.join(ROOT, "configs", "llada_8b_pretrain.py"),
               "--num_devices", "8", "--json", str(report), devices=1)
    import json

    r = json.loads(report.read_text())
    assert r["devices"] == 8 and r["parameters"] == 8_015_581_184
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # fp32 params + two Adam moments, sharded 8 ways: 12 bytes x 8.0e9 / 8 = 12.0 GB per device
    assert abs(r["argument_bytes"] - 12 * 8_015_581_184 / 8) / r["argument_bytes"] < 0.02
    assert r["temp_bytes"] > 0 and "per-device memory" in proc.stdout
