"""A Hugging Face LLaDA directory -> this project's parameters: a model in memory, or an Orbax checkpoint.

The directory is checked completely before anything is converted: config.json (model type, architecture
switches, shapes), every weight key against the key table (missing and unexpected keys), every shape against
the model the config describes, and the dtypes. Tensors are then read one at a time, put in our layout and
stacked into the scanned [layers, ...] parameters, so host memory holds the converted parameters plus one
tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from llada_jax.checkpoints import hf_keys, layout, storage
from llada_jax.checkpoints.hf_config import from_hf_config, read_hf_config
from llada_jax.checkpoints.safetensors_io import DTYPES, TensorReader, short_list
from llada_jax.config import DTYPES as FLOAT_NAMES
from llada_jax.config import LLaDAConfig
from llada_jax.errors import WeightsError

# safetensors dtype codes of the float dtypes a model may be stored in -> our dtype names.
FLOAT_CODES = {code: dtype.name for code, dtype in DTYPES.items() if dtype.name in FLOAT_NAMES}


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
    directory = storage.clean(path)
    if not storage.is_dir(directory):
        raise FileNotFoundError(f"{path}: no such model directory")
    hf_config = read_hf_config(directory)
    source = storage.join(directory, layout.HF_CONFIG_FILE)
    config = from_hf_config(hf_config, source=source)
    reader = TensorReader(directory)
    check_weights(reader, config, directory)
    codes = {t.dtype for t in reader.tensors.values()}
    stored = FLOAT_CODES[codes.pop()] if len(codes) == 1 else "float32"
    param_dtype = param_dtype or stored
    changes = dict(overrides, param_dtype=param_dtype, dtype=dtype or param_dtype)
    try:
        config = config.replace(**changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e
    return HFCheckpoint(directory, hf_config, config, reader, stored)


def check_weights(reader: TensorReader, config: LLaDAConfig, directory: str) -> None:
    expected = {t.key: t for t in hf_keys.tensors(config)}
    missing = [k for k in expected if k not in reader]
    unexpected = sorted(k for k in reader.tensors if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing weight(s) {short_list(missing)}")
    if unexpected:
        head = next(e.hf for e in hf_keys.LLADA_KEYS if not e.in_block and e.param == "ff_out")
        hint = " (weight_tying is true in config.json, so there is no separate output head)" if (
            config.weight_tying and head in unexpected) else ""
        problems.append(f"unexpected weight(s) {short_list(unexpected)}{hint}")
    if problems:
        raise WeightsError(f"{directory}: " + "; ".join(problems))
    for key, tensor in expected.items():
        info = reader.tensors[key]
        if tuple(info.shape) != tensor.hf_shape:
            raise WeightsError(f"{info.path}: {key} has shape {list(info.shape)}, but config.json implies "
                               f"{list(tensor.hf_shape)}")
        if info.dtype not in FLOAT_CODES:
            raise WeightsError(f"{info.path}: {key} has dtype {info.dtype}; expected one of {sorted(FLOAT_CODES)}")


def iter_param_leaves(ck: HFCheckpoint, *, scan_layers: bool | None = None) -> Iterator[tuple[tuple, np.ndarray]]:
    """(pure-dict key path, numpy array in param_dtype and our layout) for every parameter.

    Scanned layout: one stacked [n_layers, ...] array per block parameter, filled layer by layer; unrolled:
    one array per layer and parameter. Only one HF tensor is held besides the array being built.
    """
    import jax.numpy as jnp

    config = ck.config
    scan = config.scan_layers if scan_layers is None else scan_layers
    np_dtype = np.dtype(jnp.dtype(config.param_dtype))
    all_tensors = hf_keys.tensors(config)
    n_head = next((i for i, t in enumerate(all_tensors) if t.layer is not None), len(all_tensors))
    head = list(all_tensors[:n_head])
    tail = [t for t in all_tensors[n_head:] if t.layer is None]
    by_param: dict[str, list[hf_keys.Tensor]] = {}
    for t in all_tensors:
        if t.layer is not None:
            by_param.setdefault(t.entry.param, []).append(t)

    def read(tensor: hf_keys.Tensor) -> np.ndarray:
        return tensor.from_hf(ck.reader.read(tensor.key))

    # Top-level parameters stay transposed views of the tensor read (no copy when the dtype is kept).
    for t in head:
        yield (t.entry.param,), np.asarray(read(t), dtype=np_dtype)
    if scan:
        for name, layers in by_param.items():
            stacked = np.empty((config.n_layers, *layers[0].shape), np_dtype)
            for t in layers:
                stacked[t.layer] = read(t)
            yield (hf_keys.BLOCKS, name), stacked
    else:
        for i in range(config.n_layers):
            for name, layers in by_param.items():
                yield (hf_keys.BLOCKS, i, name), np.ascontiguousarray(read(layers[i]), dtype=np_dtype)
    for t in tail:
        yield (t.entry.param,), np.asarray(read(t), dtype=np_dtype)


def load_hf_model(path: str, dtype: str | None = None, *, param_dtype: str | None = None, mesh=None,
                  rules=None, **overrides):
    """An `LLaDAForMaskedLM` built from an HF directory, parameters placed one at a time.

    `dtype` is the compute dtype and `param_dtype` the parameter dtype (both default to the stored dtype);
    with `mesh`, parameters are sharded by the logical-axis `rules` as `load_model` does. Other keyword
    arguments set LLaDAConfig fields that do not change shapes (scan_layers, remat_policy, attention_impl).
    """
    import jax
    from flax import traverse_util

    from llada_jax.checkpoints.orbax_model import merge_params, restore_target

    ck = open_hf_dir(path, dtype=dtype, param_dtype=param_dtype, **overrides)
    target = traverse_util.flatten_dict(restore_target(ck.config, mesh, rules))
    params: dict = {}
    for leaf_path, array in iter_param_leaves(ck):
        sharding = target[leaf_path].sharding
        params[leaf_path] = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
        del array
    return merge_params(ck.config, traverse_util.unflatten_dict(params))


def convert_from_hf(input_dir: str, output_dir: str, *, dtype: str | None = None,
                    overwrite: bool = False) -> str:
    """Write an HF directory as an Orbax model checkpoint (step 0) that `load_model` / `load_pretrained`
    accept, with the tokenizer files in `<output>/tokenizer`. `dtype` sets the stored parameter dtype (and
    the compute dtype); by default the HF dtype is kept.

    A local output is built in a temporary directory and renamed into place. An output in object storage is
    written straight there, the tokenizer first and the Orbax step last: the step counts only once Orbax has
    finalised it (its commit marker)."""
    from flax import traverse_util

    from llada_jax.checkpoints.atomic import atomic_dir
    from llada_jax.checkpoints.orbax_model import save_params

    if storage.clean(input_dir) == storage.clean(output_dir):
        raise ValueError(f"{output_dir}: the output must differ from the input")
    ck = open_hf_dir(input_dir, param_dtype=dtype, scan_layers=True)

    def write(run_dir: str) -> None:
        layout.copy_tokenizer_files(ck.directory, storage.join(run_dir, layout.TOKENIZER))
        params = traverse_util.unflatten_dict(dict(iter_param_leaves(ck)))
        save_params(run_dir, params, ck.config, step=0, hf_config=ck.hf_config)

    if storage.is_url(output_dir):
        storage.check_writable(output_dir)
        if storage.listdir(output_dir):
            if not overwrite:
                raise FileExistsError(f"{output_dir}: already exists (pass --overwrite / overwrite=True to replace it)")
            storage.remove_tree(output_dir)
        write(storage.clean(output_dir))
    else:
        with atomic_dir(output_dir, overwrite=overwrite) as tmp:
            write(tmp)
    return storage.clean(output_dir)
