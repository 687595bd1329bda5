"""Test set-up: 8 fake CPU devices (set before JAX is imported)."""

import os
import tracemalloc  # noqa: F401  pytest reports unraisable exceptions with it: import it before any test can
# enter tensorflow_datasets' lazy-import context (see tests/data/conftest.py)

# 8 fake CPU devices, also when the environment already sets other XLA flags
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory):
    from tests.runs import write_pretrain_data

    return write_pretrain_data(tmp_path_factory.mktemp("pretrain_data") / "docs.jsonl")
