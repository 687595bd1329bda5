"""Conversion between this project's checkpoints and the official Hugging Face LLaDA layout."""

from __future__ import annotations

import os


def load_pretrained(path: str, *, dtype: str | None = None, **overrides):
    """Load a model from an Orbax checkpoint (a run directory, its checkpoints/ directory, or a step)."""
    from llada_jax.train.checkpoint import load_model

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    return load_model(path, dtype=dtype, **overrides)


def read_model_config(path: str):
    """The LLaDAConfig (architecture) of a saved model, without loading its weights."""
    from llada_jax.train.checkpoint import read_model_config as read_orbax_config

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    return read_orbax_config(path)
