"""Conversion between this project's checkpoints and the official Hugging Face LLaDA layout.

    load_pretrained(path)            an Orbax checkpoint or an HF directory (auto-detected) -> LLaDAForMaskedLM
    save_pretrained(model, path)     a model -> an HF directory (official layout + this project's PyTorch code)
    convert_to_hf(ckpt, hf_dir)      Orbax checkpoint -> HF directory, one parameter at a time
    convert_from_hf(hf_dir, ckpt)    HF directory -> Orbax checkpoint, one tensor at a time

Modules: `keys` (the key/layout table), `hf_config` (config.json fields), `safetensors_io` (streaming
safetensors), `orbax_io` (Orbax one parameter at a time), `hf_import` / `hf_export` (the two directions),
`layout` (files of an HF directory, atomic outputs), `hf_files/` (the exported PyTorch modeling code).
Heavy imports happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

import os


def input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (reported as one line by the CLI, not as a traceback)."""
    from llada_jax.convert.hf_config import HFConfigError
    from llada_jax.convert.hf_import import WeightsError
    from llada_jax.convert.safetensors_io import SafetensorsError
    from llada_jax.train.checkpoint import CheckpointNotFoundError

    return (HFConfigError, WeightsError, SafetensorsError, CheckpointNotFoundError, FileNotFoundError,
            FileExistsError)


def is_orbax_checkpoint(path: str) -> bool:
    """A run directory (with checkpoints/), a checkpoints/ directory, or one step of it (with params/)."""
    from llada_jax.train.checkpoint import CHECKPOINTS

    return (os.path.isdir(os.path.join(path, CHECKPOINTS)) or os.path.basename(os.path.abspath(path)) == CHECKPOINTS
            or os.path.isdir(os.path.join(path, "params")))


def is_hf_model_dir(path: str) -> bool:
    """A Hugging Face model directory: config.json and no Orbax checkpoint (a training run directory also
    holds a config.json: the training config)."""
    from llada_jax.convert.layout import is_hf_model_dir as check

    return os.path.isdir(path) and check(path) and not is_orbax_checkpoint(path)


def load_pretrained(path: str, dtype: str | None = None, **overrides):
    """Load a model from an Orbax checkpoint (a run directory, its checkpoints/ directory, or a step) or a
    Hugging Face directory (one with config.json), detected automatically.

    `dtype` sets the compute dtype; keyword arguments: `param_dtype` (default: as stored), `mesh` and `rules`
    (shard the parameters as they are placed), and LLaDAConfig fields that do not change shapes
    (scan_layers, remat_policy, attention_impl).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory (an Orbax checkpoint or a Hugging Face "
                                "directory with config.json)")
    if is_hf_model_dir(path):
        from llada_jax.convert.hf_import import load_hf_model

        return load_hf_model(path, dtype, **overrides)
    from llada_jax.train.checkpoint import CHECKPOINTS, CheckpointNotFoundError, load_model

    if not is_orbax_checkpoint(path):
        raise CheckpointNotFoundError(
            f"{path}: neither a Hugging Face model directory (no config.json) nor an Orbax checkpoint "
            f"(no '{CHECKPOINTS}' directory)")
    return load_model(path, dtype=dtype, **overrides)


def save_pretrained(model, path: str, *, dtype: str | None = None, max_shard_size: int | str = "5GB",
                    tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
    """Write `model` as a Hugging Face directory (see `hf_export.save_hf_model`)."""
    from llada_jax.convert.hf_export import save_hf_model

    return save_hf_model(model, path, dtype=dtype, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir,
                         overwrite=overwrite)


def convert_to_hf(input_path: str, output_dir: str, *, dtype: str | None = None,
                  max_shard_size: int | str = "5GB", overwrite: bool = False) -> str:
    from llada_jax.convert.hf_export import convert_orbax_to_hf

    return convert_orbax_to_hf(input_path, output_dir, dtype=dtype, max_shard_size=max_shard_size,
                               overwrite=overwrite)


def convert_from_hf(input_dir: str, output_dir: str, *, dtype: str | None = None, overwrite: bool = False) -> str:
    from llada_jax.convert.hf_import import convert_hf_to_orbax

    return convert_hf_to_orbax(input_dir, output_dir, dtype=dtype, overwrite=overwrite)


def read_model_config(path: str):
    """The LLaDAConfig (architecture) of a saved model, Orbax or Hugging Face, without loading its weights."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    if is_hf_model_dir(path):
        from llada_jax.convert.hf_config import from_hf_config, read_hf_config

        return from_hf_config(read_hf_config(path), source=os.path.join(path, "config.json"))
    from llada_jax.train.checkpoint import read_model_config as read_orbax_config

    return read_orbax_config(path)
