"""LoRA adapters of a block's projections, on Flax's `nnx.LoRA`.

A targeted projection y = x W (W [in..., out...] in the model's per-head layout) becomes

    y = x W + scale * dropout(x) A B,        A [in, rank], B [rank, out], scale = alpha / rank

with `in` and `out` the products of W's input and output dimensions: each adapter is an `nnx.LoRA(in, rank,
out)`, its two matrices `nnx.LoRAParam`s (a Param subclass, so `nnx.LoRAParam` filters the adapters and
`nnx.Not(nnx.LoRAParam)` the frozen base). nnx.LoRA fits the scanned, sharded layers as it is: blocks created
under `nnx.vmap` stack its matrices on the "layers" axis like every other parameter, and its `a_metadata` /
`b_metadata` carry the logical axes the sharding rules read. Its flat [in, rank] / [rank, out] matrices are
also PEFT's (`lora_A.weight` = A^T, `lora_B.weight` = B^T of the official [out, in] Linear), where a
flattened head dimension is heads-major, as the official q_proj / attn_out weights are. What it leaves to us:
the alpha / rank scale and the input dropout (PEFT's conventions), and flattening the per-head dimensions
around the call.

Dropout keys are per row (`row_keys` [B]), folded with the layer and the target: a row's masks depend on
(seed, step, row) only, like the diffusion noise, so a step is the same on any layout. The flattened
matrices shard by their first logical name ("heads" for heads x head_dim: the flattened dimension splits at
head boundaries when the tensor axis divides the heads, which `sharding.check_model_fits` requires); the rank
dimension is replicated.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llada_jax.config import LLaDAConfig, LoRAConfig

ADAPTERS = "adapters"  # the attribute of a block holding its nnx.Dict of adapters, by target name


def target_layout(config: LLaDAConfig, target: str) -> tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...],
                                                               tuple[str, ...]]:
    """(input dims, their logical axes, output dims, their logical axes) of a block projection's weight."""
    d, n, k, hd, m = (config.d_model, config.n_heads, config.effective_n_kv_heads, config.head_dim,
                      config.mlp_hidden_size)
    s = config.num_shared_experts * (config.expert_hidden_size or 0)
    return {
        "q_proj": ((d,), ("embed",), (n, hd), ("heads", "head_dim")),
        "k_proj": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
        "v_proj": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
        "attn_out": ((n, hd), ("heads", "head_dim"), (d,), ("embed",)),
        "ff_proj": ((d,), ("embed",), (m,), ("mlp",)),
        "up_proj": ((d,), ("embed",), (m,), ("mlp",)),
        "ff_out": ((m,), ("mlp",), (d,), ("embed",)),
        "shared_gate": ((d,), ("embed",), (s,), ("mlp",)),
        "shared_up": ((d,), ("embed",), (s,), ("mlp",)),
        "shared_down": ((s,), ("mlp",), (d,), ("embed",)),
    }[target]


DENSE_MLP_TARGETS = ("ff_proj", "up_proj", "ff_out")
SHARED_EXPERT_TARGETS = ("shared_gate", "shared_up", "shared_down")


def layer_targets(config: LLaDAConfig, lora: LoRAConfig, moe: bool) -> tuple[str, ...]:
    """The targets of `lora` that a layer has: a MoE layer's MLP has shared experts (when the model has them) in
    place of the dense projections."""
    absent = DENSE_MLP_TARGETS if moe else SHARED_EXPERT_TARGETS
    if moe and not config.num_shared_experts:
        absent = absent + SHARED_EXPERT_TARGETS
    return tuple(t for t in lora.targets if t not in absent)


def present_targets(config: LLaDAConfig, lora: LoRAConfig) -> tuple[str, ...]:
    """The targets of `lora` that some layer of the model has (the adapters a checkpoint of it holds)."""
    layers = {layer_targets(config, lora, config.is_moe_layer(i)) for i in range(config.n_layers)}
    return tuple(t for t in lora.targets if any(t in targets for targets in layers))


def make_adapters(config: LLaDAConfig, lora: LoRAConfig, *, rngs: nnx.Rngs, moe: bool = False) -> nnx.Dict:
    """One `nnx.LoRA` per target of a block that it has (`layer_targets`; float32 matrices whatever the base's
    param_dtype: they are the trained masters), computing in the model's compute dtype."""
    adapters = {}
    for target in layer_targets(config, lora, moe):
        in_dims, in_axes, out_dims, out_axes = target_layout(config, target)
        adapters[target] = nnx.LoRA(
            math.prod(in_dims), lora.rank, math.prod(out_dims), dtype=jnp.dtype(config.dtype),
            param_dtype=jnp.float32, a_initializer=torch_linear_init, rngs=rngs,
            a_metadata={"out_sharding": (in_axes[0], None), "eager_sharding": False},
            b_metadata={"out_sharding": (None, out_axes[0]), "eager_sharding": False})
    return nnx.Dict(adapters)


# PyTorch's nn.Linear default (kaiming_uniform with a = sqrt(5)), which PEFT gives lora_A: U(+-1/sqrt(fan_in)).
torch_linear_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def delta(adapter: nnx.LoRA, x: jax.Array, n_in: int, out_dims: tuple[int, ...], lora: LoRAConfig,
          row_keys: jax.Array | None = None) -> jax.Array:
    """scale * dropout(x) A B for x [B, L, in...] -> [B, L, out...] in the compute dtype. Dropout only with
    `row_keys` ([B] keys, one per row: training) and a positive rate."""
    if row_keys is not None and lora.dropout > 0:
        keep = 1.0 - lora.dropout
        masks = jax.vmap(lambda key: jax.random.bernoulli(key, keep, x.shape[1:]))(row_keys)
        x = jnp.where(masks, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
    lead = x.shape[: x.ndim - n_in]
    y = adapter(x.reshape(-1, math.prod(x.shape[x.ndim - n_in:])))  # 2-D: the fast matmul form on every backend
    return y.reshape(*lead, *out_dims) * jnp.asarray(lora.scale, y.dtype)


def fold_keys(row_keys: jax.Array, index) -> jax.Array:
    """[B] row keys folded with `index` (a layer, then a target's place in LORA_TARGETS; may be traced): the
    dropout keys of one (layer, target)."""
    return jax.vmap(lambda key: jax.random.fold_in(key, index))(row_keys)


@functools.partial(jax.jit, static_argnames="scale")
def merged_weight(weight: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A B in W's shape and dtype (computed in float32). Stacked layers ([layers, ...] leading on
    all three) merge one layer at a time (`lax.map`), so the float32 temporaries are one layer's."""
    f32 = jnp.float32

    def one(w, a, b):
        return (w.astype(f32) + (jnp.matmul(a.astype(f32), b.astype(f32)) * f32(scale)).reshape(w.shape)).astype(w.dtype)

    if a.ndim == 3:
        return jax.lax.map(lambda wab: one(*wab), (weight, a, b))
    return one(weight, a, b)


def merge_block(block: dict, lora: LoRAConfig) -> dict:
    """A block's pure-dict parameters with its adapters folded into the weights (and removed)."""
    block = dict(block)
    adapters = block.pop(ADAPTERS)
    for target, pair in adapters.items():
        holder = block
        if target in SHARED_EXPERT_TARGETS:  # the MoE MLP's own parameters
            holder = block["mlp"] = dict(block["mlp"])
        holder[target] = merged_weight(holder[target], pair["lora_a"], pair["lora_b"], lora.scale)
    return block
