"""Helpers of the data tests (imported by the test modules)."""

import json
import os


def write_jsonl(path, records) -> str:
    """Records (dicts, or raw strings written as they are) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def tiny_train_config(data_path, tmp_path, *, task="pretrain", max_length=16, batch_size=4, seed=0, **data):
    from llada_jax.config import LLaDAConfig, train_config

    c = train_config(LLaDAConfig.tiny(), task=task)
    c.data_path = str(data_path)
    c.max_length = max_length
    c.batch_size = batch_size
    c.seed = seed
    c.data.index_cache_dir = os.path.join(str(tmp_path), "index_cache")
    c.data.prefetch_buffer_size = 0
    for key, value in data.items():
        if key not in c.data:
            raise KeyError(f"no field data.{key}")
        c.data[key] = value
    return c
