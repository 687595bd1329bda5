"""A Hugging Face directory -> this project's parameters: a model in memory, or an Orbax checkpoint.

The directory holds an official LLaDA model, or an autoregressive LLaMA / Mistral / Qwen2 one (`ar_import`:
the same network under other key names, plus a mask token and padded vocabulary rows).

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

from llada_jax.checkpoints import ar_import, hf_keys, hf_moe_config, layout, storage
from llada_jax.checkpoints.hf_config import from_hf_config, read_hf_config, read_json_object
from llada_jax.checkpoints.safetensors_io import DTYPES, TensorReader, short_list
from llada_jax.config import DTYPES as FLOAT_NAMES
from llada_jax.config import LLaDAConfig
from llada_jax.errors import HFConfigError, WeightsError

# safetensors dtype codes of the float dtypes a model may be stored in -> our dtype names.
FLOAT_CODES = {code: dtype.name for code, dtype in DTYPES.items() if dtype.name in FLOAT_NAMES}


@dataclasses.dataclass
class HFCheckpoint:
    directory: str
    hf_config: dict  # config.json as read
    config: LLaDAConfig  # with the requested dtype / param_dtype / overrides
    reader: TensorReader
    stored_dtype: str  # float32 | bfloat16 | float16 (float32 when the files mix dtypes)
    table: tuple = hf_keys.LLADA_KEYS  # the key table of the files
    shapes: LLaDAConfig | None = None  # the files' own shapes when they differ from `config` (an AR vocabulary)
    vocab: ar_import.VocabPlan | None = None  # an AR checkpoint's mask token and added rows

    @property
    def is_ar(self) -> bool:
        return self.vocab is not None

    def tensors(self) -> tuple[hf_keys.Tensor, ...]:
        return hf_keys.tensors((self.shapes or self.config).replace(scan_layers=self.config.scan_layers), self.table)

    def write_tokenizer(self, dst: str) -> None:
        """The directory's tokenizer files into `dst` (an AR model's with its mask token added)."""
        if self.vocab is not None and ar_import.tokenizer_dir(self.directory):
            ar_import.write_tokenizer(self.directory, dst, self.vocab)
        else:
            layout.copy_tokenizer_files(self.directory, dst)


def read_config(directory: str, *, mask_token: str | None = None, **overrides):
    """(config.json, LLaDAConfig, ARConfig or None) of an HF directory, LLaDA or AR, checked."""
    hf_config = read_hf_config(directory)
    source = storage.join(directory, layout.HF_CONFIG_FILE)
    if ar_import.is_ar_config(hf_config):
        ar = ar_import.from_ar_config(hf_config, source=source, tokenizer_dir=ar_import.tokenizer_dir(directory),
                                      mask_token=mask_token, **overrides)
        return hf_config, ar.config, ar
    moe_layout = hf_moe_config.layout_of(hf_config)
    if hf_config.get("model_type") != "llada" and moe_layout is None:
        moe_types = hf_moe_config.LLADA2_TYPES + hf_moe_config.LLADA_MOE_TYPES
        raise HFConfigError(f"{source}: model_type is {hf_config.get('model_type')!r}; supported: 'llada', the "
                            f"Mixture-of-Experts {', '.join(map(repr, moe_types))} "
                            f"and the autoregressive {', '.join(map(repr, ar_import.AR_MODEL_TYPES))}")
    if mask_token is not None:
        raise ValueError(f"{source}: mask_token applies to autoregressive checkpoints; this is a LLaDA model "
                         f"with mask_token_id {hf_config.get('mask_token_id')}")
    if moe_layout is not None:
        ids = moe_token_ids(directory, hf_config)
        return hf_config, hf_moe_config.from_moe_config({**hf_config, **ids}, source=source, **overrides), None
    return hf_config, from_hf_config(hf_config, source=source, **overrides), None


def moe_token_ids(directory: str, hf_config: dict) -> dict[str, int]:
    """The mask / EOS / pad ids a LLaDA 2.x or LLaDA-MoE config.json leaves out (the published ones name pad only):
    from generation_config.json, else the tokenizer's `<|mask|>` and `<|endoftext|>` (tokenizer.json)."""
    import json

    found: dict[str, int] = {}
    generation = storage.join(directory, "generation_config.json")
    if storage.is_file(generation):
        g = read_json_object(generation)
        found.update({k: g[k] for k in ("mask_token_id", "eos_token_id", "pad_token_id")
                      if isinstance(g.get(k), int) and not isinstance(g.get(k), bool)})
    tokenizer = storage.join(directory, "tokenizer.json")
    if storage.is_file(tokenizer):
        try:
            added = {t["content"]: t["id"] for t in json.loads(storage.read_text(tokenizer)).get("added_tokens", [])}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFConfigError(f"{tokenizer}: cannot read its added_tokens ({e})") from e
        for name, token in (("mask_token_id", "<|mask|>"), ("eos_token_id", "<|endoftext|>")):
            if token in added:
                found.setdefault(name, added[token])
    return {k: v for k, v in found.items() if hf_config.get(k) is None}


def open_hf_dir(path: str, *, dtype: str | None = None, param_dtype: str | None = None, mask_token: str | None = None,
                **overrides) -> HFCheckpoint:
    """Read and check an HF directory. param_dtype defaults to the stored dtype, dtype to param_dtype;
    `mask_token` (AR checkpoints): an existing token to use as the mask instead of adding <|mdm_mask|>."""
    directory = storage.clean(path)
    if not storage.is_dir(directory):
        raise FileNotFoundError(f"{path}: no such model directory")
    source = storage.join(directory, layout.HF_CONFIG_FILE)
    # Architecture fields an AR import is converted with (the others are set after the weights are checked)
    ar_fields = {k: overrides.pop(k) for k in ("attention_type", "shift_logits", "block_size",
                                                "max_sequence_length") if k in overrides}
    hf_config, config, ar = read_config(directory, mask_token=mask_token, **ar_fields)
    overrides.update({} if ar else ar_fields)
    reader = TensorReader(directory)
    moe_layout = None if ar else hf_moe_config.layout_of(hf_config)
    table = hf_keys.AR_KEYS if ar else hf_keys.table_for(config, moe_layout or "llada")
    check_weights(reader, ar.source if ar else config, directory, table)
    codes = {t.dtype for t in reader.tensors.values()}
    stored = FLOAT_CODES[codes.pop()] if len(codes) == 1 else "float32"
    param_dtype = param_dtype or stored
    changes = dict(overrides, param_dtype=param_dtype, dtype=dtype or param_dtype)
    try:
        config = config.replace(**changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e
    if ar is None:
        return HFCheckpoint(directory, hf_config, config, reader, stored, table)
    return HFCheckpoint(directory, hf_config, config, reader, stored, table, ar.source, ar.vocab)


def check_weights(reader: TensorReader, config: LLaDAConfig, directory: str,
                  table: tuple = hf_keys.LLADA_KEYS) -> None:
    expected = {t.key: t for t in hf_keys.tensors(config, table)}
    head = next(e.hf for e in table if not e.in_block and e.param == "ff_out")
    missing = [k for k in expected if k not in reader]
    # A tied AR model may still store its head (transformers writes tied weights once, older files twice): the
    # embedding is the head then, and the stored copy is not read.
    tied_copy = {head} if table is hf_keys.AR_KEYS and config.weight_tying else set()
    unexpected = sorted(k for k in reader.tensors if k not in expected and k not in tied_copy)
    problems = []
    if missing:
        problems.append(f"missing weight(s) {short_list(missing)}")
    if unexpected:
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

    Scanned layout: one stacked [layers, ...] array per parameter of each layer stack, filled layer by layer (and
    expert by expert: the routed experts' [E, ...] arrays are stacked as their tensors are read); unrolled: one
    array per layer and parameter. Only one HF tensor is held besides the array being built (a fused
    query_key_value is read once for each of its parts).
    """
    import jax.numpy as jnp

    config = ck.config
    scan = config.scan_layers if scan_layers is None else scan_layers
    np_dtype = np.dtype(jnp.dtype(config.param_dtype))
    shapes = hf_keys.param_shapes((ck.shapes or config).replace(scan_layers=True))
    leaves: dict[tuple, list[hf_keys.Tensor]] = {}
    for t in ck.tensors():
        leaves.setdefault(t.leaf(scan), []).append(t)

    def read(tensor: hf_keys.Tensor) -> np.ndarray:
        array = tensor.from_hf(ck.reader.read(tensor.key))
        if ck.vocab is not None and tensor.layer is None and tensor.entry.param in ("wte", "ff_out"):
            # the embedding [V, d] / head [d, V] with the mask token's row and the padding rows
            array = ar_import.grow_rows(array, 0 if tensor.entry.param == "wte" else 1, ck.vocab)
        return array

    for path, group in leaves.items():
        first = group[0]
        if first.layer is None:  # top-level: a transposed view of the tensor read (no copy when the dtype is kept)
            yield path, np.asarray(read(first), dtype=np_dtype)
            continue
        shape = shapes[(first.stack, *first.entry.path)]
        array = np.empty(shape if scan else shape[1:], np_dtype)
        for t in group:
            array[t.leaf_index(scan)] = read(t)
        yield path, array


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


def convert_from_hf(input_dir: str, output_dir: str, *, dtype: str | None = None, overwrite: bool = False,
                    mask_token: str | None = None, **overrides) -> str:
    """Write an HF directory (LLaDA, or an AR LLaMA / Mistral / Qwen2 model) as an Orbax model checkpoint
    (step 0) that `load_model` / `load_pretrained` accept, with the tokenizer files in `<output>/tokenizer` (an
    AR tokenizer with the mask token added). `dtype` sets the stored parameter dtype (and the compute dtype);
    by default the HF dtype is kept. `mask_token` and `overrides` (attention_type, shift_logits, ...): as
    `open_hf_dir`.

    A local output is built in a temporary directory and renamed into place. An output in object storage is
    written straight there, the tokenizer first and the Orbax step last: the step counts only once Orbax has
    finalised it (its commit marker)."""
    from flax import traverse_util

    from llada_jax.checkpoints.atomic import atomic_dir
    from llada_jax.checkpoints.orbax_model import save_params

    if storage.clean(input_dir) == storage.clean(output_dir):
        raise ValueError(f"{output_dir}: the output must differ from the input")
    ck = open_hf_dir(input_dir, param_dtype=dtype, scan_layers=True, mask_token=mask_token, **overrides)

    def write(run_dir: str) -> None:
        ck.write_tokenizer(storage.join(run_dir, layout.TOKENIZER))
        params = traverse_util.unflatten_dict(dict(iter_param_leaves(ck)))
        # an AR config.json is not the base of an exported LLaDA one
        save_params(run_dir, params, ck.config, step=0, hf_config=None if ck.is_ar else ck.hf_config)

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
