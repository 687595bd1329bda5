"""The key table between this project's parameters and the official Hugging Face LLaDA state dict.

One declarative list (`LLADA_KEYS`) read by both directions, import and export: for each official tensor its
key (`{layer}` stands for the block index), the path of our parameter, and how the two layouts relate.
PyTorch Linear weights are [out, in]; our kernels are [in, out] and keep attention heads as their own axes,
so that heads can be sharded directly:

    ours                    transform    official
    wte         [V, d]      as_is        model.transformer.wte.weight                 [V, d]
    q_proj      [d, n, hd]  split_out    model.transformer.blocks.{layer}.q_proj.weight  [n*hd, d]  (k, v alike)
    attn_out    [n, hd, d]  split_in     ...attn_out.weight                           [d, n*hd]
    ff_proj     [d, m]      transpose    ...ff_proj.weight                            [m, d]     (up_proj alike)
    ff_out      [m, d]      transpose    ...ff_out.weight                             [d, m]
    q_bias      [n, hd]     flatten      ...q_proj.bias                               [n*hd]     (k, v alike;
                                                                                            include_qkv_bias)
    *_norm, ln_f [d]        as_is        ...attn_norm.weight, ff_norm.weight, ln_f.weight
    ff_out      [d, V]      transpose    model.transformer.ff_out.weight              [V, d]  (absent when tied)

Half-rotation RoPE is used on both sides, so q/k need no permutation. Our shapes are never written down here:
they come from the model itself (`nnx.eval_shape`), and a table entry whose parameter the model does not
have (the output head of a tied model) names no tensor.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from flax import traverse_util

from llada_jax.config import LLaDAConfig

BLOCKS = "blocks"


@dataclasses.dataclass(frozen=True)
class Transform:
    """How our array and the official tensor of one parameter relate."""

    name: str

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """Our array as the official tensor (a transposed view where possible: no copy)."""
        if self.name == "as_is":
            return array
        if self.name == "split_out":  # [in, heads, head_dim] -> [heads * head_dim, in]
            return array.reshape(array.shape[0], -1).T
        if self.name == "split_in":  # [heads, head_dim, out] -> [out, heads * head_dim]
            return array.reshape(-1, array.shape[-1]).T
        if self.name == "flatten":  # [heads, head_dim] -> [heads * head_dim]
            return array.reshape(-1)
        return array.T

    def from_hf(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The official tensor in our layout, `shape` being our parameter's (per-layer) shape."""
        if self.name == "as_is":
            return tensor
        if self.name == "flatten":
            return tensor.reshape(shape)
        return tensor.T.reshape(shape)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The official tensor's shape for our parameter shape."""
        if self.name == "as_is":
            return tuple(shape)
        if self.name == "split_out":
            return (int(np.prod(shape[1:])), shape[0])
        if self.name == "split_in":
            return (shape[-1], int(np.prod(shape[:-1])))
        if self.name == "flatten":
            return (int(np.prod(shape)),)
        return tuple(reversed(shape))


AS_IS, TRANSPOSE, SPLIT_OUT, SPLIT_IN, FLATTEN = (
    Transform(n) for n in ("as_is", "transpose", "split_out", "split_in", "flatten"))


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # the official key; "{layer}" is the block index for block parameters
    param: str  # our parameter name: top-level, or inside every block when `in_block`
    transform: Transform

    @property
    def in_block(self) -> bool:
        return "{layer}" in self.hf


_BLOCK = "model.transformer.blocks.{layer}."
LLADA_KEYS: tuple[Entry, ...] = (
    Entry("model.transformer.wte.weight", "wte", AS_IS),
    Entry(_BLOCK + "attn_norm.weight", "attn_norm", AS_IS),
    Entry(_BLOCK + "q_proj.weight", "q_proj", SPLIT_OUT),
    Entry(_BLOCK + "k_proj.weight", "k_proj", SPLIT_OUT),
    Entry(_BLOCK + "v_proj.weight", "v_proj", SPLIT_OUT),
    Entry(_BLOCK + "q_proj.bias", "q_bias", FLATTEN),
    Entry(_BLOCK + "k_proj.bias", "k_bias", FLATTEN),
    Entry(_BLOCK + "v_proj.bias", "v_bias", FLATTEN),
    Entry(_BLOCK + "attn_out.weight", "attn_out", SPLIT_IN),
    Entry(_BLOCK + "ff_norm.weight", "ff_norm", AS_IS),
    Entry(_BLOCK + "ff_proj.weight", "ff_proj", TRANSPOSE),
    Entry(_BLOCK + "up_proj.weight", "up_proj", TRANSPOSE),
    Entry(_BLOCK + "ff_out.weight", "ff_out", TRANSPOSE),
    Entry("model.transformer.ln_f.weight", "ln_f", AS_IS),
    Entry("model.transformer.ff_out.weight", "ff_out", TRANSPOSE),
)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One official tensor: its key, table entry, block index (None outside the blocks) and both shapes."""

    key: str
    entry: Entry
    layer: int | None
    shape: tuple[int, ...]  # ours (one layer's, for block parameters)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.entry.transform.hf_shape(self.shape)

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        return self.entry.transform.from_hf(tensor, self.shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        return self.entry.transform.to_hf(array)


@functools.lru_cache(maxsize=16)
def param_shapes(config: LLaDAConfig) -> dict[tuple, tuple[int, ...]]:
    """Every parameter's shape, from the abstract model in the scanned layout: {("wte",): (V, d),
    ("blocks", "q_proj"): (n_layers, d, n, hd), ...}."""
    from flax import nnx

    from llada_jax.model import abstract_model

    _, state = abstract_model(config.replace(scan_layers=True))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    return {path: tuple(value.shape) for path, value in flat.items()}


@functools.lru_cache(maxsize=16)
def tensors(config: LLaDAConfig, table: tuple[Entry, ...] = LLADA_KEYS) -> tuple[Tensor, ...]:
    """Every official tensor of a model with `config`, in the official key order (top-level parameters before
    the blocks first, then the blocks layer by layer, then the rest)."""
    shapes = param_shapes(config)
    head, blocks, tail = [], [], []
    seen_block = False
    for entry in table:
        if entry.in_block:
            seen_block = True
            shape = shapes.get((BLOCKS, entry.param))
            if shape is not None:
                blocks.append((entry, shape[1:]))
            continue
        shape = shapes.get((entry.param,))
        if shape is not None:
            (tail if seen_block else head).append(Tensor(entry.hf, entry, None, shape))
    per_layer = [Tensor(e.hf.format(layer=i), e, i, s) for i in range(config.n_layers) for e, s in blocks]
    return tuple(head + per_layer + tail)


def leaf_tensors(path: tuple, config: LLaDAConfig, table: tuple[Entry, ...] = LLADA_KEYS
                 ) -> list[tuple[Tensor, int | None]]:
    """The official tensors held by one leaf of a parameter tree (pure dict; scanned or unrolled layout), each
    with its index into the leaf's leading "layers" axis (None when the leaf is one layer's or top-level)."""
    by_key = {t.key: t for t in tensors(config, table)}
    if len(path) == 1:
        return [(t, None) for t in by_key.values() if t.layer is None and t.entry.param == path[0]]
    if len(path) == 2 and path[0] == BLOCKS:  # scanned: one stacked [layers, ...] array
        return [(t, t.layer) for t in by_key.values() if t.layer is not None and t.entry.param == path[1]]
    if len(path) == 3 and path[0] == BLOCKS and str(path[1]).isdigit():  # unrolled: one layer
        return [(t, None) for t in by_key.values() if t.layer == int(path[1]) and t.entry.param == path[2]]
    return []


# The LLaMA / Mistral / Qwen2 layout of transformers (`LlamaForCausalLM` and its kin), imported by
# `llada_jax.checkpoints.ar_import`: the same network under other names (gate_proj is ff_proj, the gated one).
_LAYER = "model.layers.{layer}."
AR_KEYS: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", "wte", AS_IS),
    Entry(_LAYER + "input_layernorm.weight", "attn_norm", AS_IS),
    Entry(_LAYER + "self_attn.q_proj.weight", "q_proj", SPLIT_OUT),
    Entry(_LAYER + "self_attn.k_proj.weight", "k_proj", SPLIT_OUT),
    Entry(_LAYER + "self_attn.v_proj.weight", "v_proj", SPLIT_OUT),
    Entry(_LAYER + "self_attn.q_proj.bias", "q_bias", FLATTEN),
    Entry(_LAYER + "self_attn.k_proj.bias", "k_bias", FLATTEN),
    Entry(_LAYER + "self_attn.v_proj.bias", "v_bias", FLATTEN),
    Entry(_LAYER + "self_attn.o_proj.weight", "attn_out", SPLIT_IN),
    Entry(_LAYER + "post_attention_layernorm.weight", "ff_norm", AS_IS),
    Entry(_LAYER + "mlp.gate_proj.weight", "ff_proj", TRANSPOSE),
    Entry(_LAYER + "mlp.up_proj.weight", "up_proj", TRANSPOSE),
    Entry(_LAYER + "mlp.down_proj.weight", "ff_out", TRANSPOSE),
    Entry("model.norm.weight", "ln_f", AS_IS),
    Entry("lm_head.weight", "ff_out", TRANSPOSE),
)


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The whole model as an official HF state dict of numpy arrays (small models: tests, exports)."""
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = np.asarray(value)
        for tensor, index in leaf_tensors(path, model.config):
            part = array if index is None else array[index]
            out[tensor.key] = np.asarray(tensor.to_hf(part))
    return {t.key: out[t.key] for t in tensors(model.config)}
