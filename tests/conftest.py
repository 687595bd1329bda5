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
