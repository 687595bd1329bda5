"""Two JAX processes on localhost (gloo): the global batch is both processes' slices in process order, and
each process saves and restores its own iterator state in one Orbax checkpoint."""

import os
import socket
import subprocess
import sys

from tests.data.datahelpers import write_jsonl

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_global_batch_and_checkpoint(tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"input_ids": [i + 1] * (3 + i % 7)} for i in range(30)])
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_data_check.py"), str(i), port, data,
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append((p.returncode, out))
    for i, (code, out) in enumerate(outputs):
        assert code == 0 and f"process {i}: OK" in out, out[-3000:]
    step = tmp_path / "ckpt" / "1" / "data"
    assert sorted(n for n in os.listdir(step) if n.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]
