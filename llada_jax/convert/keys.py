"""The key table between this project's parameters and the official Hugging Face LLaDA state dict.

JAX parameters keep per-head shapes and [in, out] kernels; PyTorch Linear weights are [out, in]:

    wte                 [V, d]          <->  model.transformer.wte.weight          [V, d]
    blocks.i.q_proj     [d, n, hd]      <->  model.transformer.blocks.i.q_proj.weight  [n*hd, d]
    blocks.i.k_proj     [d, k, hd]      <->  ...k_proj.weight                      [k*hd, d]   (v_proj alike)
    blocks.i.attn_out   [n, hd, d]      <->  ...attn_out.weight                    [d, n*hd]
    blocks.i.ff_proj    [d, m]          <->  ...ff_proj.weight                     [m, d]      (up_proj alike)
    blocks.i.ff_out     [m, d]          <->  ...ff_out.weight                      [d, m]
    blocks.i.*_norm     [d]             <->  ...attn_norm.weight / ff_norm.weight  [d]
    ln_f                [d]             <->  model.transformer.ln_f.weight         [d]
    ff_out              [d, V]          <->  model.transformer.ff_out.weight       [V, d]  (absent when tied)

Half-rotation RoPE is used on both sides, so q/k need no permutation.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llada_jax.config import LLaDAConfig

HF_PREFIX = "model.transformer."
BLOCK_PARAMS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")
TOP_PARAMS = ("wte", "ln_f", "ff_out")


def hf_key(name: str, layer: int | None = None) -> str:
    if layer is None:
        return f"{HF_PREFIX}{name}.weight"
    return f"{HF_PREFIX}blocks.{layer}.{name}.weight"


def hf_entries(config: LLaDAConfig) -> list[tuple[str, str, int | None]]:
    """(HF key, parameter name, layer or None) of every tensor, in the official key order."""
    out = [(hf_key("wte"), "wte", None)]
    out += [(hf_key(name, i), name, i) for i in range(config.n_layers) for name in BLOCK_PARAMS]
    out.append((hf_key("ln_f"), "ln_f", None))
    if not config.weight_tying:
        out.append((hf_key("ff_out"), "ff_out", None))
    return out


def jax_shape(name: str, config: LLaDAConfig, in_block: bool) -> tuple[int, ...]:
    d, n, k, hd, m = (config.d_model, config.n_heads, config.effective_n_kv_heads, config.head_dim,
                      config.mlp_hidden_size)
    v = config.padded_vocab_size
    if not in_block:
        return {"wte": (v, d), "ln_f": (d,), "ff_out": (d, v)}[name]
    return {
        "attn_norm": (d,), "ff_norm": (d,), "q_proj": (d, n, hd), "k_proj": (d, k, hd), "v_proj": (d, k, hd),
        "attn_out": (n, hd, d), "ff_proj": (d, m), "up_proj": (d, m), "ff_out": (m, d),
    }[name]


def hf_shape(name: str, config: LLaDAConfig, in_block: bool) -> tuple[int, ...]:
    shape = jax_shape(name, config, in_block)
    if len(shape) == 1 or (name == "wte" and not in_block):
        return shape
    if name in ("q_proj", "k_proj", "v_proj"):
        return (shape[1] * shape[2], shape[0])
    if name == "attn_out":
        return (shape[2], shape[0] * shape[1])
    return (shape[1], shape[0])


def to_hf_layout(name: str, array: np.ndarray, in_block: bool) -> np.ndarray:
    """A JAX-layout parameter as the official PyTorch tensor (a transposed view where possible)."""
    if array.ndim == 1 or (name == "wte" and not in_block):
        return array
    if name in ("q_proj", "k_proj", "v_proj"):
        return array.reshape(array.shape[0], -1).T
    if name == "attn_out":
        return array.reshape(-1, array.shape[-1]).T
    return array.T


def from_hf_layout(name: str, tensor: np.ndarray, config: LLaDAConfig, in_block: bool) -> np.ndarray:
    """An official PyTorch tensor in this project's JAX layout."""
    if tensor.ndim == 1 or (name == "wte" and not in_block):
        return tensor
    if name in ("q_proj", "k_proj", "v_proj", "attn_out"):  # [out, in] -> heads split out of the 2-D transpose
        return tensor.T.reshape(jax_shape(name, config, in_block))
    return tensor.T


def iter_jax_params(model) -> Iterator[tuple[str, int | None, object]]:
    """(name, layer or None, array) for every parameter of a model, scanned or unrolled, in HF key order."""
    config: LLaDAConfig = model.config
    yield "wte", None, model.wte[...]
    for i in range(config.n_layers):
        for name in BLOCK_PARAMS:
            if config.scan_layers:
                yield name, i, getattr(model.blocks, name)[...][i]
            else:
                yield name, i, getattr(model.blocks[i], name)[...]
    yield "ln_f", None, model.ln_f[...]
    if not config.weight_tying:
        yield "ff_out", None, model.ff_out[...]


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The whole model as an official HF state dict of numpy arrays (small models: tests, exports)."""
    return {
        hf_key(name, layer): np.asarray(to_hf_layout(name, np.asarray(value), layer is not None))
        for name, layer, value in iter_jax_params(model)
    }


def leaf_tensors(path: tuple, n_layers: int) -> list[tuple[str, str, int | None, int | None]]:
    """The HF tensors held by one leaf of a parameter tree (pure dict, scanned or unrolled layout).

    Returns (hf key, parameter name, layer or None, index into the leaf's leading "layers" axis or None).
    """
    if len(path) == 1 and path[0] in TOP_PARAMS:
        return [(hf_key(path[0]), path[0], None, None)]
    if len(path) == 2 and path[0] == "blocks" and path[1] in BLOCK_PARAMS:
        return [(hf_key(path[1], i), path[1], i, i) for i in range(n_layers)]
    if len(path) == 3 and path[0] == "blocks" and str(path[1]).isdigit() and path[2] in BLOCK_PARAMS:
        layer = int(path[1])
        return [(hf_key(path[2], layer), path[2], layer, None)]
    raise KeyError(f"parameter {'.'.join(map(str, path))} has no Hugging Face counterpart")
