"""Scaled dot-product attention: the XLA form with a flash-attention backward pass, and cuDNN's kernel on GPU.

`attention(q, k, v, key_mask, impl, pairs)` is the one entry point; `resolve_impl` picks the kernel from the
config (`attention_impl`: auto = cuDNN on GPU in 16-bit, XLA otherwise).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import LLaDAConfig
from llada_jax.model.masks import MaskIds, visible_from_ids

Array = jax.Array


def resolve_impl(config: LLaDAConfig) -> str:
    if config.attention_impl != "auto":
        return config.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and config.dtype in ("bfloat16", "float16") else "xla"



def attention(q: Array, k: Array, v: Array, key_mask: Array | None, impl: str,
              pairs: Array | MaskIds | None = None) -> Array:
    """Scaled dot-product attention, softmax in float32. key_mask: [B, S] (True = attend); pairs: [L, S] or
    [B, L, S] (True = this query may see this key: causal or annealed masks), or the `MaskIds` of the L = S
    positions (packed documents, BD3-LM's x_t ++ x_0), from which the mask is built here; None for bidirectional.

    q [B, L, N, H], k / v [B, S, K, H] with N a multiple of K (grouped-query attention); returns [B, L, N, H].
    """
    b, length, n, h = q.shape
    s = k.shape[1]
    if isinstance(pairs, MaskIds):  # both kernels take a dense mask: built from the ids here, per layer call
        pairs = visible_from_ids(pairs)
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

