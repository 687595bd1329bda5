"""A Hugging Face LLaDA directory -> this project's parameters: a model in memory, or an Orbax checkpoint.

The directory is checked completely before anything is converted: config.json (model type, architecture
switches, shapes), every weight key against the key table (missing and unexpected keys), every shape against
the config, and the dtypes. Tensors are then read one at a time, transposed to the JAX layout and stacked
into the scanned [layers, ...] parameters, so host memory holds the converted parameters plus one tensor.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from llada_jax.config import LLaDAConfig
from llada_jax.convert import keys
from llada_jax.convert.hf_config import CONFIG_FILE, from_hf_config, read_hf_config
from llada_jax.convert.layout import atomic_output_dir, copy_tokenizer_files
from llada_jax.convert.safetensors_io import TensorReader, _short

FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class WeightsError(ValueError):
    """The weight files do not match the config (missing, unexpected or mis-shaped tensors)."""


@dataclasses.dataclass
class HFCheckpoint:
    directory: str
    hf_config: dict  # config.json as read
    config: LLaDAConfig  # with the requested dtype / param_dtype / overrides
    reader: TensorReader
    stored_dtype: str  # float32 | bfloat16 | float16 (float32 when the files mix dtypes)


def open_hf_dir(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                **overrides) -> HFCheckpoint:
    """Read and check an HF directory. param_dtype defaults to the stored dtype, dtype to param_dtype."""
    directory = os.path.abspath(path.rstrip("/"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: no such model directory")
    hf_config = read_hf_config(directory)
    source = os.path.join(directory, CONFIG_FILE)
    config = from_hf_config(hf_config, source=source)
    reader = TensorReader(directory)
    check_weights(reader, config, directory)
    dtypes = {t.dtype for t in reader.tensors.values()}
    stored = FLOAT_DTYPES[dtypes.pop()] if len(dtypes) == 1 else "float32"
    param_dtype = param_dtype or stored
    changes = dict(overrides, param_dtype=param_dtype, dtype=dtype or param_dtype)
    try:
        config = config.replace(**changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e
    return HFCheckpoint(directory, hf_config, config, reader, stored)


def check_weights(reader: TensorReader, config: LLaDAConfig, directory: str) -> None:
    expected = {}
    for key, name, layer in keys.hf_entries(config):
        expected[key] = keys.hf_shape(name, config, layer is not None)
    missing = [k for k in expected if k not in reader]
    unexpected = sorted(k for k in reader.tensors if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing weight(s) {_short(missing)}")
    if unexpected:
        hint = " (weight_tying is true in config.json, so there is no separate output head)" if (
            config.weight_tying and keys.hf_key("ff_out") in unexpected) else ""
        problems.append(f"unexpected weight(s) {_short(unexpected)}{hint}")
    if problems:
        raise WeightsError(f"{directory}: " + "; ".join(problems))
    for key, shape in expected.items():
        info = reader.tensors[key]
        if tuple(info.shape) != tuple(shape):
            raise WeightsError(f"{info.path}: {key} has shape {list(info.shape)}, but config.json implies "
                               f"{list(shape)}")
        if info.dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{info.path}: {key} has dtype {info.dtype}; expected one of "
                               f"{sorted(FLOAT_DTYPES)}")


def iter_param_leaves(ck: HFCheckpoint, *, scan_layers: bool | None = None) -> Iterator[tuple[tuple, np.ndarray]]:
    """(pure-dict key path, numpy array in param_dtype and the JAX layout) for every parameter.

    Scanned layout: one stacked [n_layers, ...] array per block parameter, filled layer by layer; unrolled:
    one array per layer and parameter. Only one HF tensor is held besides the array being built.
    """
    config = ck.config
    scan = config.scan_layers if scan_layers is None else scan_layers
    np_dtype = np.dtype(_jnp_dtype(config.param_dtype))

    def tensor(name, layer):
        t = ck.reader.read(keys.hf_key(name, layer))
        return keys.from_hf_layout(name, t, config, layer is not None)

    def top(name):
        # The output head stays a transposed view of the tensor read (no copy when the dtype is kept).
        return np.asarray(tensor(name, None), dtype=np_dtype)

    yield ("wte",), top("wte")
    if scan:
        for name in keys.BLOCK_PARAMS:
            stacked = np.empty((config.n_layers, *keys.jax_shape(name, config, True)), np_dtype)
            for i in range(config.n_layers):
                stacked[i] = tensor(name, i)
            yield ("blocks", name), stacked
    else:
        for i in range(config.n_layers):
            for name in keys.BLOCK_PARAMS:
                yield ("blocks", i, name), np.ascontiguousarray(tensor(name, i), dtype=np_dtype)
    yield ("ln_f",), top("ln_f")
    if not config.weight_tying:
        yield ("ff_out",), top("ff_out")


def _jnp_dtype(name: str):
    import jax.numpy as jnp

    return jnp.dtype(name)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def load_hf_model(path: str, dtype: str | None = None, *, param_dtype: str | None = None, mesh=None,
                  rules=None, **overrides):
    """An `LLaDAForMaskedLM` built from an HF directory, parameters placed one at a time.

    `dtype` is the compute dtype and `param_dtype` the parameter dtype (both default to the stored dtype);
    with `mesh`, parameters are sharded by the logical-axis `rules` as `load_model` does. Other keyword
    arguments set LLaDAConfig fields that do not change shapes (scan_layers, remat_policy, attention_impl).
    """
    import jax
    from flax import nnx

    from llada_jax.train import checkpoint as ckpt

    ck = open_hf_dir(path, dtype=dtype, param_dtype=param_dtype, **overrides)
    target = ckpt._restore_target(ck.config, mesh, rules)
    params: dict = {}
    for leaf_path, array in iter_param_leaves(ck):
        spec = _get(target, leaf_path)
        if tuple(spec.shape) != array.shape:
            raise WeightsError(f"{ck.directory}: parameter {'.'.join(map(str, leaf_path))} has shape "
                               f"{array.shape}, the model expects {spec.shape}")
        value = jax.make_array_from_callback(array.shape, spec.sharding, lambda index, a=array: a[index])
        _set(params, leaf_path, value)
        del array
    graphdef, state = ckpt.abstract_model(ck.config)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def convert_hf_to_orbax(input_dir: str, output_dir: str, *, dtype: str | None = None,
                        overwrite: bool = False) -> str:
    """Write an HF directory as an Orbax model checkpoint (step 0) that `load_model` / `load_pretrained`
    accept, with the tokenizer files in `<output>/tokenizer`. `dtype` sets the stored parameter dtype (and
    the compute dtype); by default the HF dtype is kept."""
    from llada_jax.convert.orbax_io import save_params
    from llada_jax.train.checkpoint import TOKENIZER

    if os.path.abspath(input_dir.rstrip("/")) == os.path.abspath(output_dir.rstrip("/")):
        raise ValueError(f"{output_dir}: the output must differ from the input")
    ck = open_hf_dir(input_dir, param_dtype=dtype, scan_layers=True)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        params: dict = {}
        for leaf_path, array in iter_param_leaves(ck):
            _set(params, leaf_path, array)
        save_params(tmp, params, ck.config, step=0, hf_config=ck.hf_config)
        del params
        copy_tokenizer_files(ck.directory, os.path.join(tmp, TOKENIZER))
    return os.path.abspath(output_dir)
