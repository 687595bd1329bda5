"""This project's parameters (an Orbax checkpoint or a model in memory) -> a Hugging Face LLaDA directory.

The output is the official layout: config.json with the official field names, safetensors weights under the
official keys (`model.safetensors`, or shards plus `model.safetensors.index.json` past `max_shard_size`),
the tokenizer files when there is a tokenizer, and this project's own `configuration_llada.py` and
`modeling_llada.py` for `trust_remote_code=True`. The shards are laid out in the official key order first
and then filled one parameter at a time (one stacked [layers, ...] array restored, its layers written at
their offsets), so host memory holds one parameter and one tensor, never the model.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import numpy as np

from llada_jax.config import LLaDAConfig
from llada_jax.convert import keys
from llada_jax.convert.hf_config import CONFIG_FILE, TORCH_DTYPES, to_hf_config
from llada_jax.convert.layout import atomic_output_dir, copy_modeling_files, copy_tokenizer_files
from llada_jax.convert.safetensors_io import ShardedWriter, dtype_name, parse_size

LeafLoader = Callable[[], np.ndarray]


def _np_dtype(name: str) -> np.dtype:
    import jax.numpy as jnp

    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {TORCH_DTYPES}, got {name!r}")
    return np.dtype(jnp.dtype(name))


def write_weights(directory: str | None, config: LLaDAConfig, leaves: Iterable[tuple[tuple, LeafLoader]], *,
                  dtype: str, max_shard_size: int | str = "5GB") -> None:
    """Write every parameter (loaded leaf by leaf) as official safetensors shards in `directory`.

    With `directory=None` the leaves are still loaded in order but nothing is written (the other processes
    of a multi-process save, which take part in gathering sharded parameters).
    """
    np_dtype = _np_dtype(dtype)
    writer = None
    if directory is not None:
        entries = [(key, dtype_name(np_dtype), keys.hf_shape(name, config, layer is not None))
                   for key, name, layer in keys.hf_entries(config)]
        writer = ShardedWriter(directory, entries, max_shard_size=max_shard_size)
    try:
        for path, load in leaves:
            try:
                tensors = keys.leaf_tensors(path, config.n_layers)
            except KeyError as e:
                raise ValueError(str(e).strip("'\"")) from None
            array = load()
            if writer is None:
                continue
            for key, name, layer, index in tensors:
                part = array if index is None else array[index]
                writer.write(key, np.ascontiguousarray(keys.to_hf_layout(name, part, layer is not None),
                                                       dtype=np_dtype))
            del array
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def write_hf_dir(directory: str, config: LLaDAConfig, leaves: Iterable[tuple[tuple, LeafLoader]], *,
                 dtype: str, max_shard_size: int | str = "5GB", hf_config_base: dict | None = None,
                 tokenizer_dir: str | None = None) -> None:
    write_weights(directory, config, leaves, dtype=dtype, max_shard_size=max_shard_size)
    hf_config = to_hf_config(config, dtype, base=hf_config_base)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
        f.write("\n")
    copy_modeling_files(directory)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, directory)


def convert_orbax_to_hf(input_path: str, output_dir: str, *, dtype: str | None = None,
                        max_shard_size: int | str = "5GB", overwrite: bool = False) -> str:
    """Export an Orbax model checkpoint (run dir, its checkpoints/ dir, or a step dir) as an HF directory.

    `dtype` (float32 | bfloat16 | float16) defaults to the checkpoint's parameter dtype. A checkpoint that
    was imported from Hugging Face is written back with its original config.json fields.
    """
    from llada_jax.convert.orbax_io import ParamReader
    from llada_jax.train.checkpoint import tokenizer_path

    parse_size(max_shard_size)
    reader = ParamReader(input_path)
    dtype = dtype or reader.config.param_dtype
    _np_dtype(dtype)
    if os.path.abspath(output_dir.rstrip("/")) in (os.path.abspath(input_path.rstrip("/")), reader.run_dir):
        raise ValueError(f"{output_dir}: the output must differ from the input checkpoint")
    leaves = [(path, (lambda p=path: reader.read(p))) for path, _ in reader.leaves()]
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        write_hf_dir(tmp, reader.config, leaves, dtype=dtype, max_shard_size=max_shard_size,
                     hf_config_base=reader.hf_config(), tokenizer_dir=tokenizer_path(input_path))
    return os.path.abspath(output_dir)


def save_hf_model(model, output_dir: str, *, dtype: str | None = None, max_shard_size: int | str = "5GB",
                  tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
    """Write an `LLaDAForMaskedLM` as an HF directory (`dtype` defaults to its parameter dtype).

    Parameters sharded over several processes are gathered leaf by leaf on every process; process 0 writes.
    """
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    parse_size(max_shard_size)
    config = model.config
    dtype = dtype or config.param_dtype
    _np_dtype(dtype)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def flatten(tree, prefix=()):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from flatten(v, prefix + (k,))
            else:
                yield prefix + (k,), v

    def loader(value):
        def load():
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                return np.asarray(multihost_utils.process_allgather(value, tiled=True))
            return np.asarray(jax.device_get(value))
        return load

    leaves = [(path, loader(value)) for path, value in flatten(state)]
    if jax.process_index() != 0:
        write_weights(None, config, leaves, dtype=dtype)
        return os.path.abspath(output_dir)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        write_hf_dir(tmp, config, leaves, dtype=dtype, max_shard_size=max_shard_size,
                     tokenizer_dir=tokenizer_dir)
    return os.path.abspath(output_dir)
