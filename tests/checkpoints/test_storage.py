"""gs:// everywhere, against a GCS API server on localhost (tests/conftest.py `bucket`): training from and into a
bucket with a resume there, sampling and `convert to-hf` into it, the same results as local paths; writes that
never leave a complete-looking partial object; and one clear error for a wrong bucket or a missing object."""

import json
import os
import re
import socketserver
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from llada_jax.checkpoints import atomic, layout, storage
from llada_jax.train.metrics import read_metrics
from tests.runs import ROOT, TINY, cli, environment, write_pretrain_data

STEPS = ["--max_steps", "6", "--batch_size", "8", "--max_length", "32", "--save_steps", "3", "--logging_steps", "1",
         "--warmup_steps", "1", "--config.checkpoint.async_save=false"]


def upload_text(url, text):
    with storage.open_file(url, "w") as f:
        f.write(text)


def test_pretrain_sample_and_export_in_a_bucket_equal_local_paths(tmp_path, bucket):
    local_data = write_pretrain_data(tmp_path / "docs.jsonl")
    remote_data = f"{bucket}/data/docs.jsonl"
    upload_text(remote_data, open(local_data).read())
    local, remote = str(tmp_path / "run"), f"{bucket}/run"
    cli("pretrain", "--config", TINY, "--data_path", local_data, "--output_dir", local, *STEPS)
    # killed after step 4 (step 3 saved in the bucket), then the same command resumes from the bucket
    killed = cli("pretrain", "--config", TINY, "--data_path", remote_data, "--output_dir", remote, *STEPS,
                 kill_after_step=4, check=False)
    assert killed.returncode == -9
    assert layout.finished_steps(remote) == [3]
    resumed = cli("pretrain", "--config", TINY, "--data_path", remote_data, "--output_dir", remote, *STEPS)
    assert f"resumed from {remote} step 3" in resumed.stderr
    rows = [[(m["step"], m["loss"], m["batch_checksum"]) for m in read_metrics(run)] for run in (local, remote)]
    assert rows[0] == rows[1] and [s for s, _, _ in rows[1]] == list(range(1, 7))
    assert layout.finished_steps(remote) == [3, 6] and storage.exists(f"{remote}/config.json")
    assert storage.listdir(f"{remote}/tensorboard")  # the event files reached the bucket

    prompts = "".join(json.dumps({"input_ids": [3 + i, 17, 42, 99]}) + "\n" for i in range(5))
    (tmp_path / "prompts.jsonl").write_text(prompts)
    upload_text(f"{bucket}/prompts.jsonl", prompts)
    flags = ["--gen_length", "8", "--block_length", "4", "--steps", "4", "--batch_size", "2", "--no_progress"]
    cli("sample", "--model", local, "--input", str(tmp_path / "prompts.jsonl"), "--output",
        str(tmp_path / "answers.jsonl"), *flags)
    cli("sample", "--model", remote, "--input", f"{bucket}/prompts.jsonl", "--output", f"{bucket}/answers.jsonl",
        *flags)
    assert storage.read_text(f"{bucket}/answers.jsonl") == (tmp_path / "answers.jsonl").read_text()

    cli("convert", "to-hf", "--input", local, "--output", str(tmp_path / "hf"))
    cli("convert", "to-hf", "--input", remote, "--output", f"{bucket}/hf")
    names = sorted(os.listdir(tmp_path / "hf"))
    assert storage.listdir(f"{bucket}/hf") == names
    for name in names:
        assert storage.read_bytes(f"{bucket}/hf/{name}") == (tmp_path / "hf" / name).read_bytes(), name
    from llada_jax.checkpoints import load_pretrained

    ids = np.array([[3, 17, 42, 99, 511, 511]])
    expected = np.asarray(load_pretrained(str(tmp_path / "hf"))(ids))
    np.testing.assert_array_equal(np.asarray(load_pretrained(f"{bucket}/hf")(ids)), expected)
    # and back: the bucket's HF directory into an Orbax run in the bucket (Orbax writes straight there)
    cli("convert", "from-hf", "--input", f"{bucket}/hf", "--output", f"{bucket}/from_hf")
    assert layout.finished_steps(f"{bucket}/from_hf") == [0]
    np.testing.assert_array_equal(np.asarray(load_pretrained(f"{bucket}/from_hf")(ids)), expected)


def test_a_failed_write_leaves_nothing_that_looks_complete(bucket, monkeypatch):
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(f"{bucket}/report.json") as f:
            f.write('{"half": ')
            raise RuntimeError("interrupted")
    assert not storage.exists(f"{bucket}/report.json")
    # a directory whose upload stops part-way: its config.json (uploaded last) is missing, so it is not taken for a
    # Hugging Face model directory
    real_upload = storage.upload

    def upload_then_fail(local, url, *, last=()):
        for name in sorted(os.listdir(local)):
            if name not in last:
                real_upload(os.path.join(local, name), storage.join(url, name))
        raise OSError("connection reset")

    monkeypatch.setattr(storage, "upload", upload_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        with atomic.atomic_dir(f"{bucket}/hf", last=("config.json",)) as tmp:
            for name in ("model.safetensors", "config.json"):
                open(os.path.join(tmp, name), "w").write("{}")
    assert storage.exists(f"{bucket}/hf/model.safetensors") and not layout.is_hf_model_dir(f"{bucket}/hf")
    with pytest.raises(Exception, match="not a checkpoint|neither a Hugging Face"):
        layout.model_format(f"{bucket}/hf")


@pytest.mark.parametrize("flag", ["--data_path", "--output_dir", "--model_name_or_path"])
def test_a_wrong_bucket_or_a_missing_object_is_one_clear_error(tmp_path, bucket, flag):
    data = write_pretrain_data(tmp_path / "docs.jsonl")
    args = {"--data_path": data, "--output_dir": str(tmp_path / "out")}
    wrong = "gs://no-such-bucket-llada/x" if flag != "--data_path" else f"{bucket}/missing.jsonl"
    args[flag] = wrong
    proc = cli("pretrain", "--config", TINY, *[a for kv in args.items() for a in kv], *STEPS, check=False)
    assert proc.returncode in (1, 2), proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("llada-jax pretrain: error: ") and wrong in error, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out") and not storage.exists(f"{bucket}/missing.jsonl")


def test_lora_on_a_base_in_a_bucket_equals_local_paths(tmp_path, bucket):
    """A LoRA run whose base and output are gs:// URLs: the same losses as with local paths, a checkpoint naming the
    bucket's base, and the model (unmerged and merged) loaded from the bucket equal to the local one."""
    from llada_jax.checkpoints import load_pretrained
    from llada_jax.checkpoints.adapters import read_lora

    data = write_pretrain_data(tmp_path / "docs.jsonl")
    steps = ["--batch_size", "8", "--max_length", "32", "--logging_steps", "1", "--warmup_steps", "1",
             "--config.checkpoint.async_save=false"]
    lora = ["--config.lora.enabled=true", "--config.lora.rank=4"]
    runs = {}
    for where, root in (("local", str(tmp_path)), ("remote", bucket)):
        base, run = f"{root}/base", f"{root}/lora"
        cli("pretrain", "--config", TINY, "--data_path", data, "--output_dir", base, "--max_steps", "2", *steps)
        cli("pretrain", "--config", TINY, "--data_path", data, "--output_dir", run, "--max_steps", "3",
            "--model_name_or_path", base, *lora, *steps)
        runs[where] = (base, run)
    rows = [[(m["step"], m["loss"]) for m in read_metrics(run)] for _, run in runs.values()]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    remote_base, remote = runs["remote"]
    assert read_lora(remote, 3)[1] == f"{remote_base}/checkpoints/2"  # the base pinned to its step
    ids = np.array([[3, 17, 42, 99, 511, 511]])
    for merge in (False, True):
        local_logits = np.asarray(load_pretrained(runs["local"][1], merge_lora=merge)(ids))
        np.testing.assert_array_equal(np.asarray(load_pretrained(remote, merge_lora=merge)(ids)), local_logits)


class RecordingGcsEndpoint(socketserver.ThreadingTCPServer):
    """A plain-HTTP stand-in for an emulator on 127.0.0.1 that answers every JSON API request 404 and records each
    connection that does not start with an HTTP/1 request line (gRPC's TLS handshake or HTTP/2 preface)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.other_connections: list[bytes] = []
        super().__init__(("127.0.0.1", 0), self.Handler)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(5)
            try:
                data = self.request.recv(4096)
                if not re.match(rb"[A-Z]+ \S+ HTTP/1\.[01]\r\n", data):
                    self.server.other_connections.append(data[:16])
                    return
                while b"\r\n\r\n" not in data:
                    data += self.request.recv(4096)
                body = b'{"error": {"code": 404, "message": "No such object"}}'
                self.request.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass


def test_no_grpc_probe_against_an_emulator_even_when_gcsfs_was_imported_first():
    """With STORAGE_EMULATOR_HOST set, gs:// goes through gcsfs's flat-namespace file system: no gRPC connection to
    the emulator (gcsfs's hierarchical-namespace class asks the Storage Control API over gRPC for the bucket type,
    which no emulator answers, and waits out 60 s per file), also when gcsfs was imported before llada_jax (it picks
    its class on import). token=anon (gcsfs's setting for emulators) gives its gRPC client credentials, so the probe
    reaches the endpoint here as it does on a machine with default credentials."""
    server = RecordingGcsEndpoint()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = ("import gcsfs\n"  # first: gcsfs chooses its class now, before llada_jax sets anything
            "from llada_jax.checkpoints import storage\n"
            "print(storage.exists('gs://bucket/missing.txt'))\n")
    env = environment(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{server.server_address[1]}",
                      FSSPEC_GS_TOKEN="anon", FSSPEC_GCS_TOKEN="anon")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not server.other_connections and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
        server.shutdown()
        server.server_close()
    assert not server.other_connections, f"a non-HTTP/1 (gRPC) connection to the emulator: {server.other_connections}"
    assert proc.returncode == 0 and out.strip() == "False", err[-3000:]
