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
        if self.name == "experts_t":  # [E, in, out] -> [E, out, in]
            return array.swapaxes(-1, -2)
        return array.T

    def from_hf(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The official tensor in our layout, `shape` being our parameter's (per-layer) shape."""
        if self.name == "as_is":
            return tensor
        if self.name == "flatten":
            return tensor.reshape(shape)
        if self.name == "experts_t":
            return tensor.swapaxes(-1, -2).reshape(shape)
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
        if self.name == "experts_t":
            return (*shape[:-2], shape[-1], shape[-2])
        return tuple(reversed(shape))


AS_IS, TRANSPOSE, SPLIT_OUT, SPLIT_IN, FLATTEN, EXPERTS_T = (
    Transform(n) for n in ("as_is", "transpose", "split_out", "split_in", "flatten", "experts_t"))


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # the official key; "{layer}" is the block index, "{expert}" the routed expert's
    param: str  # our parameter: top-level, or a path inside every block ("mlp.gate") when `in_block`
    transform: Transform

    @property
    def in_block(self) -> bool:
        return "{layer}" in self.hf

    @property
    def per_expert(self) -> bool:
        """One official tensor per routed expert, our parameter stacking them [E, ...]."""
        return "{expert}" in self.hf

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.param.split("."))


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
    """One official tensor (or one part of a fused one): its key, table entry, block index (None outside the
    blocks), our shape, and where it lives in our parameters."""

    key: str
    entry: Entry
    layer: int | None
    shape: tuple[int, ...]  # ours: one layer's for block parameters, one expert's for per-expert ones
    stack: str | None = None  # the stacked parameters holding the layer in the scanned layout ("blocks", ...)
    index: int | None = None  # the layer's index in its stack
    expert: int | None = None
    rows: tuple[int, int] | None = None  # (first row, rows) of this part of a fused official tensor
    fused_shape: tuple[int, ...] | None = None  # the whole fused tensor's shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.fused_shape or self.entry.transform.hf_shape(self.shape)

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        if self.rows is not None:
            tensor = tensor[self.rows[0]: self.rows[0] + self.rows[1]]
        return self.entry.transform.from_hf(tensor, self.shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """Our array as the official tensor (this part's rows of it, for a fused one)."""
        return self.entry.transform.to_hf(array)

    def leaf(self, scanned: bool) -> tuple:
        """The pure-dict path of the parameter holding this tensor (scanned or unrolled layout)."""
        if self.layer is None:
            return (self.entry.param,)
        return (self.stack, *self.entry.path) if scanned else (BLOCKS, self.layer, *self.entry.path)

    def leaf_index(self, scanned: bool) -> tuple[int, ...]:
        """Where this tensor is inside its leaf (layer in the stack, expert): an index tuple for numpy."""
        lead = (self.index,) if scanned and self.layer is not None else ()
        return lead + ((self.expert,) if self.expert is not None else ())


@functools.lru_cache(maxsize=16)
def param_shapes(config: LLaDAConfig) -> dict[tuple, tuple[int, ...]]:
    """Every parameter's shape, from the abstract model in the scanned layout: {("wte",): (V, d),
    ("blocks", "q_proj"): (n_layers, d, n, hd), ("blocks", "mlp", "gate"): (layers, E, d, f), ...}."""
    from flax import nnx

    from llada_jax.model import abstract_model

    _, state = abstract_model(config.replace(scan_layers=True))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    return {path: tuple(value.shape) for path, value in flat.items()}


@functools.lru_cache(maxsize=16)
def tensors(config: LLaDAConfig, table: tuple[Entry, ...] = LLADA_KEYS) -> tuple[Tensor, ...]:
    """Every official tensor of a model with `config`, in the official key order (top-level parameters before
    the blocks first, then the blocks layer by layer, then the rest). The parts of a fused tensor are one
    Tensor each, with the same key, in table order."""
    from llada_jax.model import layer_stack

    shapes = param_shapes(config)
    head, per_layer, tail = [], [], []
    seen_block = False
    for entry in table:
        if entry.in_block:
            seen_block = True
            continue
        shape = shapes.get((entry.param,))
        if shape is not None:
            (tail if seen_block else head).append(Tensor(entry.hf, entry, None, shape))
    for layer in range(config.n_layers):
        stack, index = layer_stack(config, layer)
        parts: dict[str, list[Tensor]] = {}
        for entry in (e for e in table if e.in_block):
            shape = shapes.get((stack, *entry.path))
            if shape is None:  # a parameter this layer does not have (a MoE layer's dense MLP, a bias)
                continue
            shape = shape[1:]
            experts = range(shape[0]) if entry.per_expert else (None,)
            for expert in experts:
                key = entry.hf.format(layer=layer, expert=expert)
                tensor = Tensor(key, entry, layer, shape[1:] if entry.per_expert else shape, stack, index, expert)
                parts.setdefault(key, []).append(tensor)
        for key, group in parts.items():
            if len(group) == 1:
                per_layer.append(group[0])
                continue
            heights = [t.entry.transform.hf_shape(t.shape) for t in group]
            fused = (sum(h[0] for h in heights), *heights[0][1:])
            first = 0
            for t, h in zip(group, heights):
                per_layer.append(dataclasses.replace(t, rows=(first, h[0]), fused_shape=fused))
                first += h[0]
    return tuple(head + per_layer + tail)


def tensor_layout(config: LLaDAConfig, table: tuple[Entry, ...] = LLADA_KEYS) -> dict[str, tuple[int, ...]]:
    """{official key: shape} of every official tensor, in the official order (a fused tensor once)."""
    return {t.key: t.hf_shape for t in tensors(config, table)}


def leaf_tensors(path: tuple, config: LLaDAConfig, table: tuple[Entry, ...] = LLADA_KEYS
                 ) -> list[tuple[Tensor, tuple[int, ...]]]:
    """The official tensors held by one leaf of a parameter tree (pure dict; scanned or unrolled layout), each
    with its index into the leaf (layer in the stack, expert; () for the whole leaf)."""
    path = tuple(path)
    scanned = not (len(path) > 2 and path[0] == BLOCKS and str(path[1]).isdigit())
    if not scanned:
        path = (BLOCKS, int(path[1]), *path[2:])
    return [(t, t.leaf_index(scanned)) for t in tensors(config, table) if t.leaf(scanned) == path]


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


def hf_state_dict(model, table: tuple[Entry, ...] | None = None) -> dict[str, np.ndarray]:
    """The whole model as an official HF state dict of numpy arrays (small models: tests, exports), in the layout
    of `table` (default: the one the model exports to, `table_for`)."""
    from flax import nnx

    table = table if table is not None else table_for(model.config)
    return state_dict_of(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config, table)


def state_dict_of(params: dict, config: LLaDAConfig, table: tuple[Entry, ...] = LLADA_KEYS) -> dict[str, np.ndarray]:
    """A parameter tree (pure dict) as an official state dict of numpy arrays, the parts of fused tensors joined."""
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = np.asarray(value)
        for tensor, index in leaf_tensors(path, config, table):
            first = tensor.rows[0] if tensor.rows else 0
            parts.setdefault(tensor.key, []).append((first, np.asarray(tensor.to_hf(array[index]))))
    return {key: np.concatenate([a for _, a in sorted(parts[key], key=lambda p: p[0])]) if len(parts[key]) > 1
            else parts[key][0][1] for key in tensor_layout(config, table)}


# The LLaDA 2.x layout (inclusionAI's `llada2_moe`, Ling's): a fused query_key_value [(n + 2k) hd, d] whose rows are
# all the query heads, then the key heads, then the value heads (three of our parameters, in that order), per-head
# q / k norms, the first layers' dense MLP, then the router (`gate`, with its `expert_bias`), one tensor per routed
# expert (stacked [E, ...] here) and the shared experts.
_MLP = _LAYER + "mlp."
_LLADA2_ATTENTION: tuple[Entry, ...] = (
    Entry(_LAYER + "input_layernorm.weight", "attn_norm", AS_IS),
    Entry(_LAYER + "attention.query_key_value.weight", "q_proj", SPLIT_OUT),
    Entry(_LAYER + "attention.query_key_value.weight", "k_proj", SPLIT_OUT),
    Entry(_LAYER + "attention.query_key_value.weight", "v_proj", SPLIT_OUT),
    Entry(_LAYER + "attention.query_key_value.bias", "q_bias", FLATTEN),
    Entry(_LAYER + "attention.query_key_value.bias", "k_bias", FLATTEN),
    Entry(_LAYER + "attention.query_key_value.bias", "v_bias", FLATTEN),
    Entry(_LAYER + "attention.query_layernorm.weight", "q_norm", AS_IS),
    Entry(_LAYER + "attention.key_layernorm.weight", "k_norm", AS_IS),
    Entry(_LAYER + "attention.dense.weight", "attn_out", SPLIT_IN),
    Entry(_LAYER + "post_attention_layernorm.weight", "ff_norm", AS_IS),
    Entry(_MLP + "gate_proj.weight", "ff_proj", TRANSPOSE),
    Entry(_MLP + "up_proj.weight", "up_proj", TRANSPOSE),
    Entry(_MLP + "down_proj.weight", "ff_out", TRANSPOSE),
    Entry(_MLP + "gate.weight", "mlp.router", TRANSPOSE),
    Entry(_MLP + "gate.expert_bias", "mlp.expert_bias", AS_IS),
)
_LLADA2_SHARED_AND_TOP: tuple[Entry, ...] = (
    Entry(_MLP + "shared_experts.gate_proj.weight", "mlp.shared_gate", TRANSPOSE),
    Entry(_MLP + "shared_experts.up_proj.weight", "mlp.shared_up", TRANSPOSE),
    Entry(_MLP + "shared_experts.down_proj.weight", "mlp.shared_down", TRANSPOSE),
    Entry("model.norm.weight", "ln_f", AS_IS),
    Entry("lm_head.weight", "ff_out", TRANSPOSE),
)
LLADA2_KEYS: tuple[Entry, ...] = (
    Entry("model.word_embeddings.weight", "wte", AS_IS),
    *_LLADA2_ATTENTION,
    Entry(_MLP + "experts.{expert}.gate_proj.weight", "mlp.gate", TRANSPOSE),
    Entry(_MLP + "experts.{expert}.up_proj.weight", "mlp.up", TRANSPOSE),
    Entry(_MLP + "experts.{expert}.down_proj.weight", "mlp.down", TRANSPOSE),
    *_LLADA2_SHARED_AND_TOP,
)
# dFactory's merged experts (model_type "llada2_moe_veomni"): each layer's routed experts as three [E, out, in]
# tensors, without the ".weight" suffix; the rest as LLADA2_KEYS.
LLADA2_MERGED_KEYS: tuple[Entry, ...] = (
    Entry("model.word_embeddings.weight", "wte", AS_IS),
    *_LLADA2_ATTENTION,
    Entry(_MLP + "experts.gate_proj", "mlp.gate", EXPERTS_T),
    Entry(_MLP + "experts.up_proj", "mlp.up", EXPERTS_T),
    Entry(_MLP + "experts.down_proj", "mlp.down", EXPERTS_T),
    *_LLADA2_SHARED_AND_TOP,
)
# LLaDA-MoE-7B-A1B (OLMoE-style): separate q / k / v / o projections with per-head q / k norms, every layer's MLP a
# softmax-routed MoE without shared experts.
LLADA_MOE_KEYS: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", "wte", AS_IS),
    Entry(_LAYER + "input_layernorm.weight", "attn_norm", AS_IS),
    Entry(_LAYER + "self_attn.q_proj.weight", "q_proj", SPLIT_OUT),
    Entry(_LAYER + "self_attn.k_proj.weight", "k_proj", SPLIT_OUT),
    Entry(_LAYER + "self_attn.v_proj.weight", "v_proj", SPLIT_OUT),
    Entry(_LAYER + "self_attn.q_norm.weight", "q_norm", AS_IS),
    Entry(_LAYER + "self_attn.k_norm.weight", "k_norm", AS_IS),
    Entry(_LAYER + "self_attn.o_proj.weight", "attn_out", SPLIT_IN),
    Entry(_LAYER + "post_attention_layernorm.weight", "ff_norm", AS_IS),
    Entry(_MLP + "gate.weight", "mlp.router", TRANSPOSE),
    Entry(_MLP + "experts.{expert}.gate_proj.weight", "mlp.gate", TRANSPOSE),
    Entry(_MLP + "experts.{expert}.up_proj.weight", "mlp.up", TRANSPOSE),
    Entry(_MLP + "experts.{expert}.down_proj.weight", "mlp.down", TRANSPOSE),
    Entry("model.norm.weight", "ln_f", AS_IS),
    Entry("lm_head.weight", "ff_out", TRANSPOSE),
)


TABLES = {"llada": LLADA_KEYS, "llada2": LLADA2_KEYS, "llada2_merged": LLADA2_MERGED_KEYS, "llada_moe": LLADA_MOE_KEYS}


def table_for(config: LLaDAConfig, layout_name: str | None = None) -> tuple[Entry, ...]:
    """The key table of a layout (`TABLES`; `hf_moe_config.layout_of` names a config.json's), else the one a model
    is written in: the LLaDA 2.x layout for a model only it describes (experts, QK-norm, partial rotary), else
    LLaDA's."""
    if layout_name is not None:
        return TABLES[layout_name]
    if config.is_moe or config.qk_norm or config.partial_rotary_factor != 1.0:
        return LLADA2_KEYS
    return LLADA_KEYS
