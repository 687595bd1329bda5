"""This project's parameters (an Orbax checkpoint or a model in memory) -> a Hugging Face LLaDA directory.

The output is the official layout: config.json with the official field names, safetensors weights under the
official keys (`model.safetensors`, or shards plus `model.safetensors.index.json` past `max_shard_size`),
the tokenizer files when there is a tokenizer, and this project's own `configuration_llada.py` and
`modeling_llada.py` for `trust_remote_code=True`. The shards are laid out in the official key order first
and then filled one parameter at a time (one stacked [layers, ...] array restored, its layers written at
their offsets), so host memory holds one parameter and one tensor, never the model. A LoRA checkpoint is
exported merged (its base streamed the same way, each targeted weight merged with the adapters as it passes),
or as a PEFT adapter directory (`peft_adapter`).
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable

import numpy as np
from flax import traverse_util

from llada_jax.checkpoints import hf_keys, hf_moe_config, layout, storage
from llada_jax.checkpoints.atomic import atomic_dir, write_json
from llada_jax.checkpoints.hf_config import to_hf_config
from llada_jax.checkpoints.safetensors_io import ShardedWriter, dtype_name, parse_size
from llada_jax.config import DTYPES, LLaDAConfig

LeafLoader = Callable[[], np.ndarray]
HF_FILES_DIR = os.path.join(os.path.dirname(__file__), "hf_files")
MODELING_FILES = ("configuration_llada.py", "modeling_llada.py")
# Uploaded last to an object store: without config.json a directory is not a Hugging Face model directory, so a
# partial upload is never loaded as one.
LAST = (layout.HF_CONFIG_FILE,)


def _np_dtype(name: str) -> np.dtype:
    import jax.numpy as jnp

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return np.dtype(jnp.dtype(name))


def write_weights(directory: str | None, config: LLaDAConfig, leaves: Iterable[tuple[tuple, LeafLoader]], *,
                  dtype: str, max_shard_size: int | str = "5GB") -> None:
    """Write every parameter (loaded leaf by leaf) as official safetensors shards in `directory`.

    With `directory=None` the leaves are still loaded in order but nothing is written (the other processes
    of a multi-process save, which take part in gathering sharded parameters).
    """
    np_dtype = _np_dtype(dtype)
    table = hf_keys.table_for(config)
    writer = None
    if directory is not None:
        entries = [(key, dtype_name(np_dtype), shape) for key, shape in hf_keys.tensor_layout(config, table).items()]
        writer = ShardedWriter(directory, entries, max_shard_size=max_shard_size)
    try:
        for path, load in leaves:
            tensors = hf_keys.leaf_tensors(path, config, table)
            if not tensors:
                raise ValueError(f"parameter {'.'.join(map(str, path))} has no Hugging Face counterpart")
            array = load()
            if writer is None:
                continue
            for tensor, index in tensors:
                hf = np.ascontiguousarray(tensor.to_hf(array[index]), dtype=np_dtype)
                writer.write(tensor.key, hf, None if tensor.rows is None else tensor.rows[0])
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
    moe_layout = hf_keys.table_for(config) is hf_keys.LLADA2_KEYS
    if moe_layout:
        hf_config = hf_moe_config.to_moe_config(config, dtype, base=hf_config_base)
    else:
        hf_config = to_hf_config(config, dtype, base=hf_config_base)
    write_json(os.path.join(directory, layout.HF_CONFIG_FILE), hf_config)
    for f in hf_moe_config.MODELING_FILES if moe_layout else MODELING_FILES:  # this project's PyTorch code, loaded
        # with trust_remote_code=True
        shutil.copy2(os.path.join(HF_FILES_DIR, f), os.path.join(directory, f))
    if tokenizer_dir:
        layout.copy_tokenizer_files(tokenizer_dir, directory)


def convert_to_hf(input_path: str, output_dir: str, *, dtype: str | None = None,
                        max_shard_size: int | str = "5GB", overwrite: bool = False, adapter_only: bool = False) -> str:
    """Export an Orbax model checkpoint (run dir, its checkpoints/ dir, or a step dir) as an HF directory.

    `dtype` (float32 | bfloat16 | float16) defaults to the checkpoint's parameter dtype. A checkpoint that
    was imported from Hugging Face is written back with its original config.json fields.

    A LoRA checkpoint (`adapters`) is exported as the merged model: its base's parameters with the adapters
    folded into the targeted weights (`export_merged_lora`). With `adapter_only` it is written as a PEFT
    LoRA adapter directory instead (`peft_adapter.export_peft_adapter`), to apply to the exported base.
    """
    from llada_jax.checkpoints.orbax_model import ParamReader

    parse_size(max_shard_size)
    is_lora = layout.is_lora_step(*layout.find_checkpoint(input_path))
    if adapter_only:
        from llada_jax.checkpoints.peft_adapter import export_peft_adapter

        if dtype is not None:
            raise ValueError("--dtype does not apply to --adapter_only: PEFT adapters are written in float32")
        return export_peft_adapter(input_path, output_dir, overwrite=overwrite)
    if is_lora:
        return export_merged_lora(input_path, output_dir, dtype=dtype, max_shard_size=max_shard_size,
                                  overwrite=overwrite)
    reader = ParamReader(input_path)
    dtype = dtype or reader.config.param_dtype
    _np_dtype(dtype)
    if storage.clean(output_dir) in (storage.clean(input_path), reader.run_dir):
        raise ValueError(f"{output_dir}: the output must differ from the input checkpoint")
    leaves = [(path, (lambda p=path: reader.read(p))) for path in reader.paths()]
    with atomic_dir(output_dir, overwrite=overwrite, last=LAST) as tmp:
        write_hf_dir(tmp, reader.config, leaves, dtype=dtype, max_shard_size=max_shard_size,
                     hf_config_base=reader.hf_config(), tokenizer_dir=layout.tokenizer_path(input_path))
    return storage.clean(output_dir)


def export_merged_lora(input_path: str, output_dir: str, *, dtype: str | None = None,
                       max_shard_size: int | str = "5GB", overwrite: bool = False) -> str:
    """Export a LoRA checkpoint as the merged model: W + (alpha / rank) A B for every targeted weight.

    The base (an Orbax checkpoint or a Hugging Face directory) is read one parameter at a time and each
    targeted weight merged as it passes (the adapters, small, are held in memory); a base that is itself a
    LoRA checkpoint is loaded merged and written with `save_pretrained`. `dtype` defaults to the base's
    parameter dtype; the base's imported config.json fields are kept as in a plain export. The tokenizer is
    the LoRA run's, else the base's.
    """
    from llada_jax import lora as lora_lib
    from llada_jax.checkpoints.adapters import adapted_config, check_base, per_layer, read_lora_step, require_base
    from llada_jax.checkpoints.loading import load_lora_model, model_tokenizer
    from llada_jax.checkpoints.orbax_model import ParamReader
    from llada_jax.model import layer_stacks

    run_dir, step, lora, base, trained_on, adapters = read_lora_step(input_path)
    where = layout.step_dir(run_dir, step)
    if storage.clean(output_dir) in (storage.clean(input_path), run_dir, storage.clean(base)):
        raise ValueError(f"{output_dir}: the output must differ from the input checkpoint and its base")
    require_base(where, base)
    tokenizer_dir = layout.tokenizer_path(input_path) or model_tokenizer(base)
    base_format = layout.model_format(base)
    if base_format == "orbax" and layout.is_lora_step(*layout.find_checkpoint(base)):
        model = load_lora_model(run_dir, step, merge_lora=True)  # the base merged, then these adapters
        return save_pretrained(model, output_dir, dtype=dtype, max_shard_size=max_shard_size,
                               tokenizer_dir=tokenizer_dir, overwrite=overwrite)
    if base_format == "orbax":
        reader = ParamReader(base)
        config, hf_config_base = reader.config, reader.hf_config()
        base_leaves = ((path, reader.read(path)) for path in reader.paths())
    else:
        from llada_jax.checkpoints.hf_import import iter_param_leaves, open_hf_dir

        ck = open_hf_dir(base)
        config, hf_config_base = ck.config, None if ck.is_ar else ck.hf_config
        base_leaves = iter_param_leaves(ck)
    check_base(config, trained_on, where, base)
    config = adapted_config(config, trained_on)  # the attention the run trained with
    layers = per_layer(adapters, lora, config)
    stacks = layer_stacks(config)

    def merged(path: tuple, array: np.ndarray) -> np.ndarray:
        target = path[-1]
        if len(path) == 1 or target not in layers:
            return array
        array = array.astype(np.float32)  # merged in float32 and rounded once, to the output dtype, when written
        if path[0] in stacks and not str(path[1]).isdigit():  # scanned: [layers of the stack, ...]
            first, count = stacks[path[0]]
            out = np.empty_like(array)
            for j in range(count):
                a, b = layers[target][first + j]
                out[j] = np.asarray(lora_lib.merged_weight(array[j], a, b, lora.scale))
            return out
        a, b = layers[target][int(path[1])]
        return np.asarray(lora_lib.merged_weight(array, a, b, lora.scale))

    # the base's leaves are produced lazily, in order: each is read (and merged) when the writer asks for it
    leaves = ((path, (lambda p=path, a=array: merged(p, a))) for path, array in base_leaves)
    dtype = dtype or config.param_dtype
    _np_dtype(dtype)
    with atomic_dir(output_dir, overwrite=overwrite, last=LAST) as tmp:
        write_hf_dir(tmp, config, leaves, dtype=dtype, max_shard_size=max_shard_size,
                     hf_config_base=hf_config_base, tokenizer_dir=tokenizer_dir)
    return storage.clean(output_dir)


def save_pretrained(model, output_dir: str, *, dtype: str | None = None, max_shard_size: int | str = "5GB",
                  tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
    """Write an `LLaDAForMaskedLM` as an HF directory (`dtype` defaults to its parameter dtype).

    Parameters sharded over several processes are gathered leaf by leaf on every process; process 0 writes. A model
    with LoRA adapters is written merged (`model.merge_lora()`): a Hugging Face directory holds a whole model (for
    the adapters alone, `convert to-hf --adapter_only` on the saved run).
    """
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    parse_size(max_shard_size)
    model = model.merge_lora()
    config = model.config
    dtype = dtype or config.param_dtype
    _np_dtype(dtype)
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def loader(value):
        def load():
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                return np.asarray(multihost_utils.process_allgather(value, tiled=True))
            return np.asarray(jax.device_get(value))
        return load

    leaves = [(path, loader(value)) for path, value in params.items()]
    if jax.process_index() != 0:
        write_weights(None, config, leaves, dtype=dtype)
        return storage.clean(output_dir)
    with atomic_dir(output_dir, overwrite=overwrite, last=LAST) as tmp:
        write_hf_dir(tmp, config, leaves, dtype=dtype, max_shard_size=max_shard_size,
                     tokenizer_dir=tokenizer_dir)
    return storage.clean(output_dir)
