"""The LLaDA network: a LLaMA-style Transformer with bidirectional attention, in Flax NNX.

One block (the official `LLaDALlamaBlock`):

    h   = x + attn_out(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),   n = attn_norm(x)
    out = h + ff_out(silu(ff_proj(m)) * up_proj(m)),                              m = ff_norm(h)

with RMSNorm computed in float32, half-rotation ("rotate_half") rotary embeddings computed in float32,
attention without a causal mask (optionally grouped-query), and no biases. Models imported from an
autoregressive checkpoint may have q/k/v biases (`include_qkv_bias`, Qwen2), causal attention
(`attention_type="causal"`), and read the prediction for position i from the output at i - 1
(`shift_logits`, the AR alignment that Dream and DiffuLLaMA keep; `prediction_states`). The model is the embedding
`wte`, the blocks, a final `ln_f`, and an untied output head `ff_out` (or the transposed embedding when
`weight_tying`). Parameter names are the official module names, so the Hugging Face key table
(`llada_jax.checkpoints.hf_keys`) is a short list.

Parameters keep per-head shapes ([embed, heads, head_dim] for q/k/v, [heads, head_dim, embed] for the
output projection) so that heads can be sharded directly, and every one carries its logical axis names as
Flax `out_sharding` metadata for the sharding rules (`llada_jax.sharding`).

KV cache (for the cached samplers). `hidden_states_and_kv` runs the whole sequence like `hidden_states` and
also returns every layer's keys (before RoPE) and values (`KVCache`); `hidden_states_from_kv` runs only a
window of positions, whose queries attend to the cached keys and values of the whole sequence with the
window's own recomputed. Both go through the same block code (`LLaDABlock.forward`).
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llada_jax import lora as lora_lib
from llada_jax import sharding
from llada_jax.config import LORA_TARGETS, LLaDAConfig, LoRAConfig

Array = jax.Array

# Activation layouts used for sharding constraints.
BLD = ("batch", "length", "embed")
BLNH = ("batch", "length", "heads", "head_dim")
BLKH = ("batch", "length", "kv_heads", "head_dim")
BLM = ("batch", "length", "mlp")
BLV = ("batch", "length", "vocab")


def _dtype(name: str):
    return jnp.dtype(name)


# ----------------------------------------------------------------------------------------------------
# Functional pieces (also used by the tests against numpy formulas)
# ----------------------------------------------------------------------------------------------------


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """Official RMSNorm: normalise in float32, cast back to x's dtype, then scale by the weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables [B, L, 1, head_dim] (float32) for the half-rotation convention."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, head_dim / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x * cos + rotate_half(x) * sin, computed in float32 and cast back (official `rope_full_precision`)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def positions_from_mask(attention_mask: Array | None, batch: int, length: int) -> Array:
    """Absolute positions counting real tokens only: a left-padded row starts at 0 at its first token."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def prediction_sources(attention_mask: Array | None, index: Array, batch: int) -> Array:
    """int32 [B, n]: for the positions `index` [n] of a sequence (`attention_mask` [B, L] or None), the index of
    the output that predicts them under `shift_logits`: the one before, except at a row's first real token
    (position 0), which predicts itself. Padding positions (before the first real token) point at themselves."""
    if attention_mask is None:
        positions = jnp.broadcast_to(index, (batch, index.shape[0]))
    else:
        positions = jnp.take(positions_from_mask(attention_mask, *attention_mask.shape), index, axis=1)
    return jnp.where(positions > 0, index - 1, index).astype(jnp.int32)


def _resolve_attention_impl(config: LLaDAConfig) -> str:
    if config.attention_impl != "auto":
        return config.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and config.dtype in ("bfloat16", "float16") else "xla"


def visible_pairs(attention_type: str, query_index: Array, key_length: int, block_size: int | None = None,
                  block_anchor=0) -> Array | None:
    """bool [L, S] (or [B, L, S] with a per-row `block_anchor` [B]): which keys each query may see by the attention
    type (None: all). `query_index` [L] holds the queries' indices into the S keys (a window of a sequence starts
    past 0). block_causal: index i is in block floor((i - block_anchor) / block_size), so the blocks are laid from
    the anchor (0 in training; the end of the prompt when sampling, so that generation starts a block and a
    left-padded prompt is cut into the same blocks as the unpadded one) and a query sees the keys of its block
    and of every block before it."""
    keys = jnp.arange(key_length, dtype=jnp.int32)
    if attention_type == "bidirectional":
        return None
    if attention_type == "causal":
        return keys[None, :] <= query_index[:, None]
    anchor = jnp.asarray(block_anchor, jnp.int32)[..., None, None]  # [] or [B] -> broadcastable to [B?, L, S]
    query_block = jnp.floor_divide(query_index[:, None] - anchor, block_size)
    key_block = jnp.floor_divide(keys[None, :] - anchor, block_size)
    return key_block <= query_block


def attention(q: Array, k: Array, v: Array, key_mask: Array | None, impl: str, pairs: Array | None = None) -> Array:
    """Scaled dot-product attention, softmax in float32. key_mask: [B, S] (True = attend); pairs: [L, S] or
    [B, L, S] (True = this query may see this key: causal or annealed masks), None for bidirectional.

    q [B, L, N, H], k / v [B, S, K, H] with N a multiple of K (grouped-query attention); returns [B, L, N, H].
    """
    b, length, n, h = q.shape
    s = k.shape[1]
    # One boolean [B or 1, L or 1, S] mask: keys by key_mask, query-key pairs by `pairs`.
    mask = None if key_mask is None else key_mask.astype(bool)[:, None, :]
    if pairs is not None:
        pairs = pairs.reshape((-1, length, s))
        mask = pairs if mask is None else mask & pairs
    if impl == "cudnn":
        # cuDNN takes a mask as a bias with the full [L, S] extent (batch and heads may broadcast); a key mask
        # [B, 1, 1, S] is rejected ("Bias must have same seq length as QKV").
        full = None if mask is None else jnp.broadcast_to(mask[:, None], (b, 1, length, s))
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=full, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as e:  # shape / dtype / GPU cuDNN does not support
            _warn_cudnn_fallback(e, q, k)
    kv = k.shape[2]
    g = n // kv
    # Heads-major layout, 4-D: the G = N / K query heads of a kv head are rows of one batched matmul with it
    # ([B, K] batch dims, G * L rows), so k and v are never repeated. (A separate size-G dimension, as in
    # jax.nn.dot_product_attention, makes XLA:CPU's forward pass about 2x slower, even for G = 1.)
    qh = q.reshape(b, length, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * length, h)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    out = _sdpa(qh, kh, vh, mask)  # [B, K, G * L, H]
    return out.reshape(b, kv, g, length, h).transpose(0, 3, 1, 2, 4).reshape(b, length, n, h)


@functools.lru_cache(maxsize=None)
def _warn_cudnn_fallback_once(reason: str, shapes: str) -> None:
    logging.getLogger("llada_jax").warning("cuDNN attention unavailable for %s (%s); using the XLA attention",
                                           shapes, reason)


def _warn_cudnn_fallback(error: Exception, q: Array, k: Array) -> None:
    _warn_cudnn_fallback_once(f"{type(error).__name__}: {error}", f"q {q.shape} {q.dtype}, k {k.shape}")


# Scores of masked keys: large and negative but finite, so a row with no key left gives a uniform softmax
# rather than NaN (the value jax.nn.dot_product_attention uses).
_MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)


def _masked(scores, mask, fill):
    """`scores` [B, K, M, S] (M = G * L rows, query-head-group major) where `mask` [B or 1, L or 1, S] allows,
    `fill` elsewhere; the [L, S] mask is applied to each group's rows without being repeated G times."""
    if mask is None:
        return scores
    b, k, m, s = scores.shape
    length = mask.shape[1]
    grouped = scores.reshape(b, k, m // length, length, s)
    return jnp.where(mask[:, None, None], grouped, fill).reshape(b, k, m, s)


def _sdpa_forward(q, k, v, mask):
    """q [B, K, M, H], k / v [B, K, S, H] -> (out [B, K, M, H], (exp_scores [B, K, M, S], row_sums [B, K, M, 1])).

    The softmax is left unnormalised through the second matmul: out = (E V) / rowsum(E) with E = exp(scores -
    rowmax), float32, which divides [M, H] rather than [M, S] values (as flash attention does).
    """
    f32 = jnp.float32
    scores = jnp.einsum("bkmh,bksh->bkms", q, k, preferred_element_type=f32) * f32(q.shape[-1] ** -0.5)
    scores = _masked(scores, mask, _MASKED_SCORE)
    exp_scores = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    row_sums = jnp.sum(exp_scores, axis=-1, keepdims=True)
    out = jnp.einsum("bkms,bksh->bkmh", exp_scores.astype(v.dtype), v, preferred_element_type=f32) / row_sums
    return out.astype(v.dtype), (exp_scores, row_sums)


@jax.custom_vjp
def _sdpa(q, k, v, mask):
    """Softmax attention with the flash-attention form of the backward pass.

    With P = softmax(scores), autodiff computes d(scores) = P (dP - sum_s(P dP)), a reduction over every
    [M, S] score matrix; the equal sum_h(dO O) ([M, H] sized) saves that pass over the scores, the most
    memory-bound part of the backward pass on every backend. The forward keeps the float32 exponentials and
    their row sums (the memory autodiff would keep for P) for the backward.
    """
    return _sdpa_forward(q, k, v, mask)[0]


def _sdpa_fwd(q, k, v, mask):
    out, (exp_scores, row_sums) = _sdpa_forward(q, k, v, mask)
    return out, (q, k, v, mask, exp_scores, row_sums, out)


def _sdpa_bwd(residuals, d_out):
    q, k, v, mask, exp_scores, row_sums, out = residuals
    f32 = jnp.float32
    inv_sums = 1.0 / row_sums  # P = exp_scores * inv_sums
    d_probs = jnp.einsum("bkmh,bksh->bkms", d_out, v, preferred_element_type=f32)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # = sum_s P dP
    # d(scores) = P (dP - delta), and 0 for masked keys (their scores are constants; P is 0 there anyway,
    # except in a row with no key left). The 1/sqrt(H) scale goes with it to q and k.
    d_scores = exp_scores * ((d_probs - delta) * (inv_sums * f32(q.shape[-1] ** -0.5)))
    d_scores = _masked(d_scores, mask, 0.0).astype(q.dtype)
    d_q = jnp.einsum("bkms,bksh->bkmh", d_scores, k)
    # dK and dV as their [H, S] transposes (row-major products of the [M, S] matrices; transposing those
    # instead, as P^T dO asks, is slower on CPU), then swapped back: a small [S, H] transpose.
    # dV = P^T dO = E^T (dO / rowsum).
    d_k = jnp.einsum("bkmh,bkms->bkhs", q, d_scores).swapaxes(-1, -2)
    d_out_scaled = (d_out.astype(f32) * inv_sums).astype(v.dtype)
    d_v = jnp.einsum("bkmh,bkms->bkhs", d_out_scaled, exp_scores.astype(v.dtype)).swapaxes(-1, -2)
    return d_q, d_k, d_v, None


_sdpa.defvjp(_sdpa_fwd, _sdpa_bwd)


def dense(x: Array, w: Array, n_in: int = 1, out_dtype=None) -> Array:
    """Contract the last `n_in` dims of x with the first `n_in` dims of w, as one 2-D matmul over all tokens.

    Numerically an einsum such as "bld,dnh->blnh"; flattening the token dims first matters on CPU, where
    XLA's backward pass of a multi-dimensional contraction is several times slower than of a 2-D matmul.
    """
    lead, inner, out = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:], w.shape[n_in:]
    y = jax.lax.dot_general(x.reshape(-1, int(np.prod(inner))), w.reshape(int(np.prod(inner)), -1),
                            (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return y.reshape(*lead, *out)


def _remat(fn, policy: str, *, in_scan: bool):
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "save_dots": jax.checkpoint_policies.dots_saveable,
        "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_out_proj": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=not in_scan)


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


def _param(value: Array, logical_axes: tuple[str, ...]) -> nnx.Param:
    """A parameter whose `out_sharding` metadata names its dimensions logically. Eager sharding is off: Flax
    would otherwise shard the value at creation with the names as-is, without fitting them to the mesh and
    shape (`sharding.state_shardings` does that, and the trainer creates parameters straight into it)."""
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


def _trunc_normal(rngs: nnx.Rngs, shape, std, dtype) -> Array:
    """Truncated normal cut at 3 standard deviations (the official "mitchell" init)."""
    return (jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)


class LLaDABlock(nnx.Module):
    """One pre-norm bidirectional LLaMA block. `layer_id` may be traced (blocks created under nnx.vmap)."""

    def __init__(self, config: LLaDAConfig, layer_id, *, rngs: nnx.Rngs):
        self.config = config
        self.lora: LoRAConfig | None = None
        d, n, k, hd, m = (config.d_model, config.n_heads, config.effective_n_kv_heads, config.head_dim,
                          config.mlp_hidden_size)
        pd = _dtype(config.param_dtype)
        depth_scale = 1.0 / jnp.sqrt(2.0 * (jnp.asarray(layer_id, jnp.float32) + 1.0))
        self.attn_norm = _param(jnp.ones((d,), pd), ("norm",))
        self.q_proj = _param(_trunc_normal(rngs, (d, n, hd), d**-0.5, pd), ("embed", "heads", "head_dim"))
        self.k_proj = _param(_trunc_normal(rngs, (d, k, hd), d**-0.5, pd), ("embed", "kv_heads", "head_dim"))
        self.v_proj = _param(_trunc_normal(rngs, (d, k, hd), d**-0.5, pd), ("embed", "kv_heads", "head_dim"))
        if config.include_qkv_bias:
            self.q_bias = _param(jnp.zeros((n, hd), pd), ("heads", "head_dim"))
            self.k_bias = _param(jnp.zeros((k, hd), pd), ("kv_heads", "head_dim"))
            self.v_bias = _param(jnp.zeros((k, hd), pd), ("kv_heads", "head_dim"))
        self.attn_out = _param(
            _trunc_normal(rngs, (n, hd, d), d**-0.5 * depth_scale, pd), ("heads", "head_dim", "embed"))
        self.ff_norm = _param(jnp.ones((d,), pd), ("norm",))
        self.ff_proj = _param(_trunc_normal(rngs, (d, m), d**-0.5, pd), ("embed", "mlp"))
        self.up_proj = _param(_trunc_normal(rngs, (d, m), d**-0.5, pd), ("embed", "mlp"))
        self.ff_out = _param(_trunc_normal(rngs, (m, d), m**-0.5 * depth_scale, pd), ("mlp", "embed"))

    def add_adapters(self, lora: LoRAConfig, rngs: nnx.Rngs) -> None:
        """Give the targeted projections LoRA adapters (B at zero: the outputs do not change)."""
        self.lora = lora
        self.adapters = lora_lib.make_adapters(self.config, lora, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, key_mask: Array | None, pairs: Array | None = None,
                 dropout_keys: Array | None = None) -> Array:
        return self.forward(x, cos, sin, key_mask, pairs=pairs, dropout_keys=dropout_keys)[0]

    def project(self, name: str, x: Array, n_in: int = 1, dropout_keys: Array | None = None) -> Array:
        """x times the projection `name` (in the compute dtype), plus its LoRA adapter's term when it has one
        (`dropout_keys`: this layer's [B] row keys, training only)."""
        y = dense(x, getattr(self, name)[...].astype(_dtype(self.config.dtype)), n_in)
        if self.lora is None or name not in self.lora.targets:
            return y
        keys = None if dropout_keys is None else lora_lib.fold_keys(dropout_keys, LORA_TARGETS.index(name))
        return y + lora_lib.delta(self.adapters[name], x, n_in, y.shape[x.ndim - n_in:], self.lora, keys)

    def qkv(self, x: Array, dropout_keys: Array | None = None) -> tuple[Array, Array, Array]:
        """Queries [B, n, heads, head_dim], keys and values [B, n, kv_heads, head_dim] of x, before RoPE."""
        c = self.config
        dt = _dtype(c.dtype)
        h = rms_norm(x, self.attn_norm[...], c.rms_norm_eps).astype(dt)
        q, k, v = (self.project(f"{name}_proj", h, dropout_keys=dropout_keys) for name in "qkv")
        if c.include_qkv_bias:
            q, k, v = (y + getattr(self, f"{name}_bias")[...].astype(dt) for name, y in zip("qkv", (q, k, v)))
        return sharding.constrain(q, BLNH), sharding.constrain(k, BLKH), sharding.constrain(v, BLKH)

    def forward(self, x: Array, cos: Array, sin: Array, key_mask: Array | None, cached: "KVCache | None" = None,
                start=None, key_rope: tuple[Array, Array] | None = None, pairs: Array | None = None,
                dropout_keys: Array | None = None) -> tuple[Array, "KVCache"]:
        """The block on `x` [B, n, D]: (output [B, n, D], KVCache of x's positions, each [B, n, kv_heads, head_dim]).

        Without `cached`, x is the whole sequence and attends to itself (`key_mask` [B, n]). With `cached`, the
        keys and values [B, S, kv_heads, head_dim] of a whole sequence of S positions, x holds its positions
        `start` .. start + n - 1 (`cos` / `sin` of those positions): their fresh keys and values replace the
        cached ones there, and x attends to all S positions (`key_mask` [B, S], `key_rope` the cos / sin of all
        S positions). Keys are cached before RoPE (applied as they are read), so a cache fill computes exactly
        the numbers of the plain forward. `pairs` [n, S] (or [B, n, S]): which keys each query may see (causal
        attention), None: all. `dropout_keys` [B]: this layer's row keys for the adapters' dropout (training).
        """
        c = self.config
        dt = _dtype(c.dtype)
        q, k, v = self.qkv(x, dropout_keys)
        fresh = KVCache(k, v)
        key_cos, key_sin = cos, sin
        if cached is not None:
            k, v = (sharding.constrain(jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), start, 1), BLKH)
                    for old, new in ((cached.k, k), (cached.v, v)))
            key_cos, key_sin = key_rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, key_cos, key_sin)
        att = attention(q, k, v, key_mask, _resolve_attention_impl(c), pairs)
        att = self.project("attn_out", att, 2, dropout_keys)
        x = sharding.constrain(x + checkpoint_name(att, "attn_out"), BLD)

        h = rms_norm(x, self.ff_norm[...], c.rms_norm_eps).astype(dt)
        gate = sharding.constrain(self.project("ff_proj", h, dropout_keys=dropout_keys), BLM)
        up = sharding.constrain(self.project("up_proj", h, dropout_keys=dropout_keys), BLM)
        mlp = self.project("ff_out", jax.nn.silu(gate) * up, dropout_keys=dropout_keys)
        return sharding.constrain(x + checkpoint_name(mlp, "mlp_out"), BLD), fresh


class KVCache(NamedTuple):
    """Keys (before RoPE) and values of every layer: k, v [n_layers, B, S, kv_heads, head_dim] in the compute
    dtype (per block: [B, S, kv_heads, head_dim]). Filled by `LLaDAForMaskedLM.hidden_states_and_kv`, read by
    `hidden_states_from_kv`."""

    k: Array
    v: Array


class LLaDAForMaskedLM(nnx.Module):
    """LLaDA mask predictor: `model(input_ids, attention_mask=None) -> float32 logits [B, L, V]`.

    `attention_mask` [B, L] marks real tokens with 1. Keys where it is 0 are ignored by every query, and
    positions count real tokens only, so a left-padded row gives the same logits on its real tokens as the
    same row without padding.

    With `lora` (a LoRAConfig), every block's targeted projections carry LoRA adapters (`llada_jax.lora`):
    their `nnx.LoRAParam`s are the trainable part, the rest the frozen base; `merge_lora()` folds them in.
    """

    def __init__(self, config: LLaDAConfig, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.config = config
        self.lora = lora
        d, v = config.d_model, config.padded_vocab_size
        pd = _dtype(config.param_dtype)
        self.wte = _param(_trunc_normal(rngs, (v, d), d**-0.5, pd), ("vocab", "embed"))
        if config.scan_layers:
            self.blocks = _stacked_blocks(config, rngs, lora)
        else:
            self.blocks = nnx.List([LLaDABlock(config, i, rngs=rngs) for i in range(config.n_layers)])
        self.ln_f = _param(jnp.ones((d,), pd), ("norm",))
        if not config.weight_tying:
            self.ff_out = _param(_trunc_normal(rngs, (d, v), d**-0.5, pd), ("embed", "vocab"))
        if lora is not None and not config.scan_layers:  # drawn after the base: its initial values stay the same
            for block in self.blocks:
                block.add_adapters(lora, rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, visible: Array | None = None, *,
                 positions: Array | None = None, block_anchor=0, dropout_keys: Array | None = None) -> Array:
        """float32 logits [B, L, V], logits[:, i] the prediction for position i (with `shift_logits`, read from
        the output at i - 1). `visible` [L, L] or [B, L, L] (True = query i may see key j) replaces the attention
        type's pattern (the annealed masks of causal-to-bidirectional adaptation, the noisy ++ clean sequence of
        block-diffusion training); `positions` [B, L] replaces the positions counted from `attention_mask`;
        `block_anchor` (scalar or [B]) is where block_causal blocks are laid from; `dropout_keys` [B] (one key per
        row) turns on the LoRA adapters' dropout (training)."""
        hidden = self.hidden_states(input_ids, attention_mask, visible, positions=positions, block_anchor=block_anchor,
                                    dropout_keys=dropout_keys)
        return self.logits(self.prediction_states(hidden, attention_mask))

    def prediction_states(self, hidden: Array, attention_mask: Array | None = None) -> Array:
        """The final residual streams aligned with the positions they predict: `hidden` [B, L, D] of a whole
        sequence itself, or with `shift_logits` the stream at i - 1 for position i (a row's first real token keeps
        its own, as position 0 does in Dream, so a left-padded row predicts as the unpadded one)."""
        if not self.config.shift_logits:
            return hidden
        sources = prediction_sources(attention_mask, jnp.arange(hidden.shape[1]), hidden.shape[0])
        return jnp.take_along_axis(hidden, sources[..., None], axis=1)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | None = None, **overrides) -> "LLaDAForMaskedLM":
        """Load an Orbax checkpoint or a Hugging Face directory (auto-detected); see
        `llada_jax.checkpoints.load_pretrained` for the keyword arguments (param_dtype, mesh, scan_layers, ...).
        (The one import of the checkpoint layer from below it: the convention users expect.)"""
        from llada_jax.checkpoints import load_pretrained

        return load_pretrained(path, dtype, **overrides)

    def save_pretrained(self, path: str, *, dtype: str | None = None, max_shard_size: int | str = "5GB",
                        tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
        """Write this model as a Hugging Face directory in the official LLaDA layout (safetensors, config.json
        and this project's PyTorch modeling code; LoRA adapters merged); see `llada_jax.checkpoints.save_pretrained`."""
        from llada_jax.checkpoints import save_pretrained

        return save_pretrained(self, path, dtype=dtype, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir,
                               overwrite=overwrite)

    def merge_lora(self) -> "LLaDAForMaskedLM":
        """This model with its LoRA adapters folded into the base weights (W + alpha / rank A B, in the base's
        param dtype): a plain model with the same outputs up to float rounding and no adapter matmuls. A model
        without adapters is returned as it is."""
        if self.lora is None:
            return self
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        if self.config.scan_layers:
            params["blocks"] = lora_lib.merge_block(params["blocks"], self.lora)
        else:
            params["blocks"] = {i: lora_lib.merge_block(block, self.lora) for i, block in params["blocks"].items()}
        graphdef, state = abstract_model(self.config)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    def embed(self, input_ids: Array) -> Array:
        """The embeddings of `input_ids`: the residual stream starts in the wider of the parameter and compute
        dtypes (what every block's output is, so the layer loop's carry keeps one dtype: a bfloat16 base under
        float32 compute starts in float32)."""
        c = self.config
        dt = jnp.promote_types(_dtype(c.param_dtype), _dtype(c.dtype))
        return sharding.constrain(jnp.take(self.wte[...], input_ids, axis=0).astype(dt), BLD)

    def rope_and_key_mask(self, attention_mask: Array | None, batch: int, length: int,
                          positions: Array | None = None):
        """(cos, sin [B, L, 1, head_dim] of each position, boolean key mask [B, L] or None) for a sequence;
        `positions` [B, L] replaces the positions counted from `attention_mask`."""
        c = self.config
        if positions is None:
            positions = positions_from_mask(attention_mask, batch, length)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        return cos, sin, None if attention_mask is None else attention_mask.astype(bool)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None, visible: Array | None = None, *,
                      positions: Array | None = None, block_anchor=0, dropout_keys: Array | None = None) -> Array:
        """Final residual stream (before ln_f) for `input_ids` [B, L], at each position (not shifted:
        `prediction_states` aligns it with the predicted positions). Keyword arguments as in `__call__`."""
        length = input_ids.shape[1]
        rope = self.rope_and_key_mask(attention_mask, *input_ids.shape, positions=positions)
        pairs = visible if visible is not None else self.visible_keys(jnp.arange(length), length, block_anchor)
        return self._layers(self.embed(input_ids), *rope, pairs=pairs, dropout_keys=dropout_keys)[0]

    def hidden_states_and_kv(self, input_ids: Array, attention_mask: Array | None = None, *, block_anchor=0
                             ) -> tuple[Array, KVCache]:
        """`hidden_states` plus every layer's keys and values of every position (a KV-cache fill):
        (hidden [B, L, D], KVCache [n_layers, B, L, kv_heads, head_dim]). Same numbers as `hidden_states`."""
        length = input_ids.shape[1]
        return self._layers(self.embed(input_ids), *self.rope_and_key_mask(attention_mask, *input_ids.shape),
                            pairs=self.visible_keys(jnp.arange(length), length, block_anchor), collect=True)

    def hidden_states_from_kv(self, window_ids: Array, start, cache: KVCache, attention_mask: Array | None = None,
                              *, block_anchor=0) -> Array:
        """Final residual stream of positions `start` .. start + n - 1 of a sequence of S positions, computed
        from their tokens `window_ids` [B, n] and the cached keys and values of the whole sequence (`cache`,
        from `hidden_states_and_kv`; the window's own are recomputed). `attention_mask` [B, S] is the whole
        sequence's; positions outside the window contribute their cached keys and values only, so the result
        equals `hidden_states` of the whole sequence at the window when the cache is up to date with it.
        `start` may be traced; n is static."""
        return self.window_and_kv(window_ids, start, cache, attention_mask, block_anchor=block_anchor)[0]

    def window_and_kv(self, window_ids: Array, start, cache: KVCache, attention_mask: Array | None = None, *,
                      block_anchor=0) -> tuple[Array, KVCache]:
        """`hidden_states_from_kv` plus the window's own keys and values (KVCache [n_layers, B, n, ...]): what
        an exact block-by-block cache appends once a block is final."""
        b, n = window_ids.shape
        key_cos, key_sin, key_mask = self.rope_and_key_mask(attention_mask, b, cache.k.shape[2])
        cos, sin = (jax.lax.dynamic_slice_in_dim(t, start, n, axis=1) for t in (key_cos, key_sin))
        pairs = self.visible_keys(start + jnp.arange(n), cache.k.shape[2], block_anchor)
        return self._layers(self.embed(window_ids), cos, sin, key_mask, pairs=pairs, cache=cache, start=start,
                            key_rope=(key_cos, key_sin))

    def visible_keys(self, query_index: Array, key_length: int, block_anchor=0) -> Array | None:
        """Which keys each query sees by the attention type (see `visible_pairs`); None for all."""
        c = self.config
        return visible_pairs(c.attention_type, query_index, key_length, c.block_size, block_anchor)

    def _layers(self, x: Array, cos: Array, sin: Array, key_mask: Array | None, *, pairs: Array | None = None,
                cache: KVCache | None = None, start=None, key_rope=None, collect: bool = False,
                dropout_keys: Array | None = None) -> tuple[Array, KVCache | None]:
        """Run every block over x: (x, the blocks' KVCache of x's positions when `collect` or with `cache`)."""
        c = self.config
        plain = cache is None and not collect

        def apply_block(graphdef, params, x, layer_cache, layer):
            block = nnx.merge(graphdef, params)
            keys = None if dropout_keys is None else lora_lib.fold_keys(dropout_keys, layer)
            if plain:
                return block(x, cos, sin, key_mask, pairs, keys), None
            return block.forward(x, cos, sin, key_mask, layer_cache, start, key_rope, pairs, keys)

        if c.scan_layers:
            graphdef, params = nnx.split(self.blocks)
            step = _remat(lambda h, xs: apply_block(graphdef, xs[0], h, xs[1], xs[2]), c.remat_policy, in_scan=True)
            x, kv = jax.lax.scan(step, x, (params, cache, jnp.arange(c.n_layers, dtype=jnp.uint32)))
            return x, kv
        kvs = []
        for i, block in enumerate(self.blocks):
            graphdef, params = nnx.split(block)
            layer_cache = None if cache is None else KVCache(cache.k[i], cache.v[i])
            x, layer_kv = _remat(lambda p, h, lc, layer: apply_block(graphdef, p, h, lc, layer), c.remat_policy,
                                 in_scan=False)(params, x, layer_cache, jnp.uint32(i))
            kvs.append(layer_kv)
        return x, None if plain else KVCache(jnp.stack([a.k for a in kvs]), jnp.stack([a.v for a in kvs]))

    def logits(self, x: Array) -> Array:
        """float32 logits from the final residual stream: ln_f then the output head."""
        c = self.config
        dt = _dtype(c.dtype)
        h = rms_norm(x, self.ln_f[...], c.rms_norm_eps).astype(dt)
        head = self.wte[...].T if c.weight_tying else self.ff_out[...]
        logits = dense(h, head.astype(dt), out_dtype=jnp.float32)
        return sharding.constrain(logits.astype(jnp.float32), BLV)


def _stacked_blocks(config: LLaDAConfig, rngs: nnx.Rngs, lora: LoRAConfig | None) -> LLaDABlock:
    """n_layers blocks whose parameters are stacked on a leading "layers" axis (for lax.scan)."""

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0, 0), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs, layer_id):
        block = LLaDABlock(config, layer_id, rngs=rngs)
        if lora is not None:
            block.add_adapters(lora, rngs)
        return block

    return create(rngs, jnp.arange(config.n_layers))


def abstract_model(config: LLaDAConfig, lora: LoRAConfig | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, parameter state of ShapeDtypeStructs) of a model, built with `nnx.eval_shape`: the shapes
    and dtypes without allocating anything (restore targets, shardings, sizes)."""
    return nnx.split(nnx.eval_shape(lambda: LLaDAForMaskedLM(config, rngs=nnx.Rngs(0), lora=lora)))


def count_params(config: LLaDAConfig) -> int:
    """Number of parameters of a model with this config, counted abstractly (nothing is allocated)."""
    _, state = abstract_model(config)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
