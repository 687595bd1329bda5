"""The network's building blocks: RMSNorm, rotary embeddings, projections, parameters and remat policies.

Functional pieces (the tests check them against numpy formulas), shared by the attention, the MLPs and the
network. Activations are named by logical axes (`BLD`, ...) for the sharding constraints (`llada_jax.sharding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

# Activation layouts used for sharding constraints.
BLD = ("batch", "length", "embed")
BLNH = ("batch", "length", "heads", "head_dim")
BLKH = ("batch", "length", "kv_heads", "head_dim")
BLM = ("batch", "length", "mlp")
BLV = ("batch", "length", "vocab")


def dtype(name: str):
    return jnp.dtype(name)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """Official RMSNorm: normalise in float32, cast back to x's dtype, then scale by the weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_tables(positions: Array, rotary_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables [B, L, 1, rotary_dim] (float32) for the half-rotation convention: the frequencies
    theta^(-2i / rotary_dim) of the rotated dimensions (all of head_dim, or its first part: partial rotary)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, head_dim / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x * cos + rotate_half(x) * sin, computed in float32 and cast back (official `rope_full_precision`), on the
    first cos.shape[-1] dimensions of each head; the others pass through (partial rotary, LLaDA 2.x)."""
    rotary = cos.shape[-1]
    x32 = x[..., :rotary].astype(jnp.float32)
    half = rotary // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = (x32 * cos + rotated * sin).astype(x.dtype)
    return out if rotary == x.shape[-1] else jnp.concatenate([out, x[..., rotary:]], axis=-1)


def dense(x: Array, w: Array, n_in: int = 1, out_dtype=None) -> Array:
    """Contract the last `n_in` dims of x with the first `n_in` dims of w, as one 2-D matmul over all tokens.

    Numerically an einsum such as "bld,dnh->blnh"; flattening the token dims first matters on CPU, where
    XLA's backward pass of a multi-dimensional contraction is several times slower than of a 2-D matmul.
    """
    lead, inner, out = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:], w.shape[n_in:]
    y = jax.lax.dot_general(x.reshape(-1, int(np.prod(inner))), w.reshape(int(np.prod(inner)), -1),
                            (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return y.reshape(*lead, *out)


def remat(fn, policy: str, *, in_scan: bool):
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "save_dots": jax.checkpoint_policies.dots_saveable,
        "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_out_proj": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=not in_scan)



def param(value: Array, logical_axes: tuple[str, ...]) -> nnx.Param:
    """A parameter whose `out_sharding` metadata names its dimensions logically. Eager sharding is off: Flax
    would otherwise shard the value at creation with the names as-is, without fitting them to the mesh and
    shape (`sharding.state_shardings` does that, and the trainer creates parameters straight into it)."""
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


def trunc_normal(rngs: nnx.Rngs, shape, std, dtype) -> Array:
    """Truncated normal cut at 3 standard deviations (the official "mitchell" init)."""
    return (jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)

