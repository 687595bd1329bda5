"""One pre-norm Transformer block: an attention and an MLP slot (dense SwiGLU, or a Mixture of Experts).

    h   = x + attn_out(attention(rope(qk_norm(q_proj(n))), rope(qk_norm(k_proj(n))), v_proj(n))),   n = attn_norm(x)
    out = h + mlp(m),                                                                            m = ff_norm(h)

with mlp(m) = ff_out(silu(ff_proj(m)) * up_proj(m)) (the official `LLaDALlamaBlock`) or the `MoE` of
`llada_jax.model.moe` (held as `mlp`). QK-norm (LLaDA 2.x, LLaDA-MoE) is an RMSNorm over head_dim of each query
and key head before RoPE. Parameters keep per-head shapes ([embed, heads, head_dim] for q/k/v, [heads, head_dim,
embed] for the output projection) so that heads can be sharded directly; every one carries its logical axis
names as Flax `out_sharding` metadata for the sharding rules (`llada_jax.sharding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llada_jax import lora as lora_lib
from llada_jax import sharding
from llada_jax.config import LORA_TARGETS, LLaDAConfig, LoRAConfig
from llada_jax.model.attention import attention, resolve_impl
from llada_jax.model.kv_cache import KVCache
from llada_jax.model.layers import BLD, BLKH, BLM, BLNH, apply_rope, dense, dtype, param, rms_norm, trunc_normal
from llada_jax.model.moe import MoE, RouterStats

Array = jax.Array

# The projections of an MoE block's shared experts (they live in its `mlp`, and may carry LoRA adapters).
SHARED_EXPERT_PROJECTIONS = lora_lib.SHARED_EXPERT_TARGETS


class LLaDABlock(nnx.Module):
    """One pre-norm block. `layer_id` may be traced (blocks created under nnx.vmap); `moe` (static) gives it the
    Mixture-of-Experts MLP of a MoE model's layer, else the dense one."""

    def __init__(self, config: LLaDAConfig, layer_id, *, rngs: nnx.Rngs, moe: bool = False):
        self.config = config
        self.moe = moe
        self.lora: LoRAConfig | None = None
        d, n, k, hd, m = (config.d_model, config.n_heads, config.effective_n_kv_heads, config.head_dim,
                          config.mlp_hidden_size)
        pd = dtype(config.param_dtype)
        depth_scale = 1.0 / jnp.sqrt(2.0 * (jnp.asarray(layer_id, jnp.float32) + 1.0))
        self.attn_norm = param(jnp.ones((d,), pd), ("norm",))
        self.q_proj = param(trunc_normal(rngs, (d, n, hd), d**-0.5, pd), ("embed", "heads", "head_dim"))
        self.k_proj = param(trunc_normal(rngs, (d, k, hd), d**-0.5, pd), ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(trunc_normal(rngs, (d, k, hd), d**-0.5, pd), ("embed", "kv_heads", "head_dim"))
        if config.include_qkv_bias:
            self.q_bias = param(jnp.zeros((n, hd), pd), ("heads", "head_dim"))
            self.k_bias = param(jnp.zeros((k, hd), pd), ("kv_heads", "head_dim"))
            self.v_bias = param(jnp.zeros((k, hd), pd), ("kv_heads", "head_dim"))
        if config.qk_norm:
            self.q_norm = param(jnp.ones((hd,), pd), ("norm",))
            self.k_norm = param(jnp.ones((hd,), pd), ("norm",))
        self.attn_out = param(
            trunc_normal(rngs, (n, hd, d), d**-0.5 * depth_scale, pd), ("heads", "head_dim", "embed"))
        self.ff_norm = param(jnp.ones((d,), pd), ("norm",))
        if moe:
            self.mlp = MoE(config, depth_scale, rngs=rngs)
        else:
            self.ff_proj = param(trunc_normal(rngs, (d, m), d**-0.5, pd), ("embed", "mlp"))
            self.up_proj = param(trunc_normal(rngs, (d, m), d**-0.5, pd), ("embed", "mlp"))
            self.ff_out = param(trunc_normal(rngs, (m, d), m**-0.5 * depth_scale, pd), ("mlp", "embed"))

    def add_adapters(self, lora: LoRAConfig, rngs: nnx.Rngs) -> None:
        """Give the targeted projections LoRA adapters (B at zero: the outputs do not change)."""
        self.lora = lora
        self.adapters = lora_lib.make_adapters(self.config, lora, rngs=rngs, moe=self.moe)

    def __call__(self, x: Array, cos: Array, sin: Array, key_mask: Array | None, pairs: Array | None = None,
                 dropout_keys: Array | None = None) -> Array:
        return self.forward(x, cos, sin, key_mask, pairs=pairs, dropout_keys=dropout_keys)[0]

    def weight(self, name: str) -> Array:
        """The projection `name`: the block's own, or a shared expert's of its MoE MLP."""
        return getattr(self.mlp if name in SHARED_EXPERT_PROJECTIONS else self, name)[...]

    def project(self, name: str, x: Array, n_in: int = 1, dropout_keys: Array | None = None) -> Array:
        """x times the projection `name` (in the compute dtype), plus its LoRA adapter's term when it has one
        (`dropout_keys`: this layer's [B] row keys, training only)."""
        y = dense(x, self.weight(name).astype(dtype(self.config.dtype)), n_in)
        if self.lora is None or name not in self.adapters:
            return y
        keys = None if dropout_keys is None else lora_lib.fold_keys(dropout_keys, LORA_TARGETS.index(name))
        return y + lora_lib.delta(self.adapters[name], x, n_in, y.shape[x.ndim - n_in:], self.lora, keys)

    def qkv(self, x: Array, dropout_keys: Array | None = None) -> tuple[Array, Array, Array]:
        """Queries [B, n, heads, head_dim], keys and values [B, n, kv_heads, head_dim] of x, before RoPE."""
        c = self.config
        dt = dtype(c.dtype)
        h = rms_norm(x, self.attn_norm[...], c.rms_norm_eps).astype(dt)
        q, k, v = (self.project(f"{name}_proj", h, dropout_keys=dropout_keys) for name in "qkv")
        if c.include_qkv_bias:
            q, k, v = (y + getattr(self, f"{name}_bias")[...].astype(dt) for name, y in zip("qkv", (q, k, v)))
        if c.qk_norm:
            q, k = (rms_norm(y, norm[...], c.rms_norm_eps).astype(dt)
                    for y, norm in ((q, self.q_norm), (k, self.k_norm)))
        return sharding.constrain(q, BLNH), sharding.constrain(k, BLKH), sharding.constrain(v, BLKH)

    def forward(self, x: Array, cos: Array, sin: Array, key_mask: Array | None, cached: KVCache | None = None,
                start=None, key_rope: tuple[Array, Array] | None = None, pairs: Array | None = None,
                dropout_keys: Array | None = None) -> tuple[Array, KVCache, RouterStats | None]:
        """The block on `x` [B, n, D]: (output [B, n, D], KVCache of x's positions, each [B, n, kv_heads, head_dim],
        the router's `RouterStats` over x's real tokens, those of `key_mask` (None for a dense MLP)).

        Without `cached`, x is the whole sequence and attends to itself (`key_mask` [B, n]). With `cached`, the
        keys and values [B, S, kv_heads, head_dim] of a whole sequence of S positions, x holds its positions
        `start` .. start + n - 1 (`cos` / `sin` of those positions): their fresh keys and values replace the
        cached ones there, and x attends to all S positions (`key_mask` [B, S], `key_rope` the cos / sin of all
        S positions). Keys are cached before RoPE (applied as they are read), so a cache fill computes exactly
        the numbers of the plain forward. `pairs` [n, S] (or [B, n, S]): which keys each query may see (causal
        attention), None: all. `dropout_keys` [B]: this layer's row keys for the adapters' dropout (training).
        """
        c = self.config
        dt = dtype(c.dtype)
        q, k, v = self.qkv(x, dropout_keys)
        fresh = KVCache(k, v)
        key_cos, key_sin = cos, sin
        if cached is not None:
            k, v = (sharding.constrain(jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), start, 1), BLKH)
                    for old, new in ((cached.k, k), (cached.v, v)))
            key_cos, key_sin = key_rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, key_cos, key_sin)
        att = attention(q, k, v, key_mask, resolve_impl(c), pairs)
        att = self.project("attn_out", att, 2, dropout_keys)
        x = sharding.constrain(x + checkpoint_name(att, "attn_out"), BLD)

        h = rms_norm(x, self.ff_norm[...], c.rms_norm_eps).astype(dt)
        load = None
        if self.moe:
            valid = key_mask  # x's real tokens, which the load counts (with a cache: x's window of the sequence's)
            if cached is not None and key_mask is not None:
                valid = jax.lax.dynamic_slice_in_dim(key_mask, start, x.shape[1], axis=1)
            mlp, load = self.mlp(h, lambda name, y: self.project(name, y, dropout_keys=dropout_keys), valid)
        else:
            gate = sharding.constrain(self.project("ff_proj", h, dropout_keys=dropout_keys), BLM)
            up = sharding.constrain(self.project("up_proj", h, dropout_keys=dropout_keys), BLM)
            mlp = self.project("ff_out", jax.nn.silu(gate) * up, dropout_keys=dropout_keys)
        return sharding.constrain(x + checkpoint_name(mlp, "mlp_out"), BLD), fresh, load

