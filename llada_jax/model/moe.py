"""The Mixture-of-Experts MLP (LLaDA-MoE, LLaDA 2.x): a router, routed SwiGLU experts and shared experts.

    scores  = sigmoid(x W_r) or softmax(x W_r)                     float32, [T, E]
    chosen  = top-k of (scores + expert_bias), inside the best router_topk_groups groups
    weights = scores[chosen] (/ their sum when router_norm_topk) * router_scale
    out     = sum_k weights_k * expert_{chosen_k}(x) + shared(x),    expert(x) = down(silu(gate x) * up x)

The bias takes part in the choice only (auxiliary-loss-free balancing). With groups (LLaDA 2.x: 256 experts in 8
groups, 4 kept), each group is scored by the sum of its two best biased scores; the experts of the other groups are
not chosen. Ties go to the lower index, for groups and experts (`lax.top_k`).

Dropless: every (token, chosen expert) pair is computed, none dropped, no capacity. The pairs are sorted by expert
and the experts run as grouped matmuls (`jax.lax.ragged_dot`: the experts' weights [E, in, out], each group of
rows with its own expert), so the work is the chosen pairs' whatever the balance.

Expert parallelism. The experts' dimension has the logical name "exp" (mesh axis `expert`), and the batch is
sharded over `expert` too. Under a mesh with expert > 1 the routed part runs in `shard_map`: each device sorts
its own pairs by expert, sends each pair's token to the device holding its expert (`all_to_all`), runs its local
experts over what it received, and sends the outputs back (a second `all_to_all`), where they are weighted and
summed. The exchange buffers have room for every pair of a device going to one device (XLA:CPU has no ragged
all-to-all), so nothing is dropped: [expert, pairs per device, embed] per buffer. When the batch cannot be split
over the expert axis (a batch of one being sampled), the tokens are the same on every expert device: each runs
its local experts' pairs and the outputs are summed over the axis (`psum`). The expert weights are gathered
whole over the other axes (fsdp, tensor) inside the map: they are sharded over `expert` only while they are used.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llada_jax import sharding
from llada_jax.config import LLaDAConfig
from llada_jax.model.layers import BLD, dense, dtype, param, trunc_normal

Array = jax.Array

EXPERT_AXIS = "expert"  # the mesh axis of the experts


# ----------------------------------------------------------------------------------------------------
# The router
# ----------------------------------------------------------------------------------------------------


def router_scores(logits: Array, score: str) -> Array:
    """float32 scores [T, E] of float32 router logits."""
    return jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def route(logits: Array, config: LLaDAConfig, expert_bias: Array | None = None) -> tuple[Array, Array]:
    """(chosen experts int32 [T, k], their weights float32 [T, k]) from float32 router logits [T, E]; the experts
    in order of their biased score (ties: the lower index first)."""
    c = config
    scores = router_scores(logits.astype(jnp.float32), c.router_score)
    biased = scores if expert_bias is None else scores + expert_bias.astype(jnp.float32)
    if c.router_groups > 1:
        t, e = biased.shape
        grouped = biased.reshape(t, c.router_groups, e // c.router_groups)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, groups]
        kept = jax.lax.top_k(group_scores, c.router_topk_groups)[1]
        keep = jnp.zeros(group_scores.shape, bool).at[jnp.arange(t)[:, None], kept].set(True)
        biased = jnp.where(keep[..., None], grouped, -jnp.inf).reshape(t, e)
    chosen = jax.lax.top_k(biased, c.experts_per_token)[1]
    weights = jnp.take_along_axis(scores, chosen, axis=-1)
    if c.router_norm_topk:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return chosen.astype(jnp.int32), weights * jnp.float32(c.router_scale)


def expert_load(chosen: Array, num_experts: int, valid: Array | None = None) -> Array:
    """float32 [E]: how many (token, expert) pairs each expert got; `valid` [T] counts real tokens only."""
    one_hot = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32).sum(axis=1)  # [T, E]
    if valid is not None:
        one_hot = one_hot * valid.astype(jnp.float32)[:, None]
    return one_hot.sum(axis=0)


class RouterStats(NamedTuple):
    """What a MoE layer's router did over a call's real tokens (sums, so that micro-batches and layers add up):
    the balance metrics, the expert-bias update and the auxiliary losses of training are computed from them.
    Stacked over the MoE layers by the network: [n_moe_layers, E] and [n_moe_layers]."""

    load: Array  # float32 [E]: (token, expert) pairs routed to each expert
    score_sum: Array  # float32 [E]: the sum over tokens of each expert's score, normalised to sum 1 per token
    z_sum: Array  # float32 []: the sum over tokens of logsumexp(router logits)^2 (ST-MoE's router z-loss)


def load_balance_loss(stats: RouterStats, experts_per_token: int) -> Array:
    """The auxiliary load-balancing loss of stacked `RouterStats` (Switch Transformer / OLMoE): per layer
    E x sum_i f_i P_i, f_i = the fraction of tokens sent to expert i, P_i = its mean score over the tokens
    (k when balanced), averaged over the layers. The load is counted, not differentiated; P carries the gradient."""
    tokens = jnp.maximum(jnp.sum(stats.load, axis=-1) / experts_per_token, 1.0)  # [layers]
    f = jax.lax.stop_gradient(stats.load) / tokens[:, None]
    p = stats.score_sum / tokens[:, None]
    return jnp.mean(stats.load.shape[-1] * jnp.sum(f * p, axis=-1))


def router_z_loss(stats: RouterStats, experts_per_token: int) -> Array:
    """ST-MoE's router z-loss of stacked `RouterStats`: the mean over tokens of logsumexp(logits)^2, averaged over
    the layers."""
    tokens = jnp.maximum(jnp.sum(stats.load, axis=-1) / experts_per_token, 1.0)
    return jnp.mean(stats.z_sum / tokens)


def expert_bias_update(load: Array, rate) -> Array:
    """The change of each layer's expert bias after a step with `load` [layers, E]: + rate for the experts below
    the layer's mean load, - rate above it (DeepSeek-V3's auxiliary-loss-free balancing), 0 at the mean."""
    return rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def router_stats(logits: Array, chosen: Array, config: LLaDAConfig, valid: Array | None = None) -> RouterStats:
    """`RouterStats` of float32 router logits [T, E] and the chosen experts [T, k]; `valid` [T]: real tokens.
    The scores are normalised per token (softmax scores already are; sigmoid ones are divided by their sum, as
    DeepSeek-V3's balance loss does), so each token's sum is 1."""
    logits = logits.astype(jnp.float32)
    scores = router_scores(logits, config.router_score)
    scores = scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
    z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
    weight = jnp.ones(logits.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    return RouterStats(expert_load(chosen, config.num_experts, valid), jnp.sum(scores * weight[:, None], axis=0),
                       jnp.sum(z * weight))


# ----------------------------------------------------------------------------------------------------
# Dropless grouped computation
# ----------------------------------------------------------------------------------------------------


def grouped_swiglu(rows: Array, group_sizes: Array, gate: Array, up: Array, down: Array) -> Array:
    """SwiGLU experts over rows sorted by expert: rows [R, d], `group_sizes` [E] (rows of each expert, in order;
    rows past their sum are outputs of zero), gate / up [E, d, f], down [E, f, d] -> [R, d]."""
    matmul = _sizing_matmul if _SIZING[0] else jax.lax.ragged_dot
    g = matmul(rows, gate, group_sizes)
    u = matmul(rows, up, group_sizes)
    return matmul(jax.nn.silu(g) * u, down, group_sizes)


# Sizing (compile-check on CPU): XLA:CPU lowers ragged_dot densely, every row against every local expert
# ([experts, rows, d] operands), where TPU / GPU run a grouped matmul whose buffers are the rows' ([R, out]). Traced
# inside `sized_as_grouped_matmul`, the grouped matmuls are replaced by a matmul of the same operands and output
# shapes (every row against the first expert): a program with the native op's buffers, for its memory only.
_SIZING = [False]


def _sizing_matmul(rows: Array, weights: Array, group_sizes: Array) -> Array:
    del group_sizes
    return jnp.einsum("rd,edf->rf", rows, weights[:1])


@contextlib.contextmanager
def sized_as_grouped_matmul():
    """Trace (lower) programs inside this to size them as with a native grouped matmul (see `_SIZING`); their
    outputs are not the model's. On leaving, JAX's caches are cleared, so that no function traced inside (a
    jitted function caches its traces) ever runs a sized program."""
    _SIZING[0] = True
    try:
        yield
    finally:
        _SIZING[0] = False
        jax.clear_caches()


def _sorted_by(ids: Array, n: int) -> tuple[Array, Array, Array]:
    """(a stable order sorting `ids` [R], its inverse, the count of each id in [0, n)); ids >= n sort last."""
    order = jnp.argsort(ids, stable=True)
    inverse = jnp.argsort(order)
    sizes = jnp.sum(ids[:, None] == jnp.arange(n, dtype=ids.dtype), axis=0).astype(jnp.int32)
    return order, inverse, sizes


def experts_local(x: Array, chosen: Array, gate: Array, up: Array, down: Array) -> Array:
    """The chosen experts' outputs [T, k, d] of tokens x [T, d] (chosen [T, k]), all experts on this device."""
    t, k = chosen.shape
    order, inverse, sizes = _sorted_by(chosen.reshape(-1), gate.shape[0])
    out = grouped_swiglu(x[order // k], sizes, gate, up, down)
    return out[inverse].reshape(t, k, -1)


def _experts_exchanged(x: Array, chosen: Array, gate: Array, up: Array, down: Array, ep: int) -> Array:
    """`experts_local` inside shard_map with tokens split over the expert axis (size `ep`) and each device holding
    E / ep of the experts: the pairs go to their experts' devices and back with two all_to_alls."""
    t, k = chosen.shape
    local = gate.shape[0]
    pairs = t * k
    order, inverse, _ = _sorted_by(chosen.reshape(-1), local * ep)
    expert = chosen.reshape(-1)[order]
    dest = expert // local
    counts = jnp.sum(dest[:, None] == jnp.arange(ep), axis=0)
    rank = jnp.arange(pairs) - (jnp.cumsum(counts) - counts)[dest]  # place within the slot of its device
    send = jnp.zeros((ep, pairs, x.shape[-1]), x.dtype).at[dest, rank].set(x[order // k])
    send_ids = jnp.full((ep, pairs), local, jnp.int32).at[dest, rank].set(expert - dest * local)
    recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)  # [source device, pairs, d]
    recv_ids = jax.lax.all_to_all(send_ids, EXPERT_AXIS, 0, 0, tiled=True)
    r_order, r_inverse, sizes = _sorted_by(recv_ids.reshape(-1), local)  # empty slots (id `local`) last
    done = grouped_swiglu(recv.reshape(ep * pairs, -1)[r_order], sizes, gate, up, down)[r_inverse]
    back = jax.lax.all_to_all(done.reshape(ep, pairs, -1), EXPERT_AXIS, 0, 0, tiled=True)
    return back[dest, rank][inverse].reshape(t, k, -1)


def _experts_replicated(x: Array, chosen: Array, gate: Array, up: Array, down: Array, ep: int) -> Array:
    """`experts_local` inside shard_map with the same tokens on every device of the expert axis: each runs the
    pairs of its own experts (the others give zeros), summed over the axis."""
    t, k = chosen.shape
    local = gate.shape[0]
    # Marked as varying over the axis before use, so the tokens' gradient is the psum of the devices' parts. (Left
    # invariant, jax 0.10 gives a wrong gradient for them here; tests/test_moe.py compares with one device.)
    x = jax.lax.pcast(x, EXPERT_AXIS, to="varying")
    ids = chosen.reshape(-1) - jax.lax.axis_index(EXPERT_AXIS) * local
    ids = jnp.where((ids >= 0) & (ids < local), ids, local)
    order, inverse, sizes = _sorted_by(ids, local)
    out = grouped_swiglu(x[order // k], sizes, gate, up, down)[inverse]
    return out.reshape(t, k, -1)


def routed_experts(x: Array, chosen: Array, weights: Array, gate: Array, up: Array, down: Array) -> Array:
    """sum_k weights_k * expert_{chosen_k}(x) for x [B, L, d] (chosen / weights [B, L, k]), in float32 and cast to
    x's dtype; on the expert axis of the active mesh when it has one (see the module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    ep = 1 if mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)
    b, length, d = x.shape
    k = chosen.shape[-1]

    def combine(outputs, w):  # [.., k, d] x [.., k] -> [.., d]
        return jnp.sum(outputs.astype(jnp.float32) * w[..., None], axis=-2).astype(x.dtype)

    if ep == 1:
        out = experts_local(x.reshape(b * length, d), chosen.reshape(-1, k), gate, up, down)
        return combine(out.reshape(b, length, k, d), weights)

    batch = sharding.logical_to_spec(BLD, mesh_shape=dict(mesh.shape), shape=x.shape)[0]
    split = EXPERT_AXIS in sharding.as_tuple(batch)
    tokens, ids = P(batch, None, None), P(batch, None, None)
    experts = P(EXPERT_AXIS, None, None)

    def body(x, chosen, weights, gate, up, down):
        bl, ll = x.shape[:2]
        flat, flat_chosen = x.reshape(bl * ll, d), chosen.reshape(-1, k)
        run = _experts_exchanged if split else _experts_replicated
        out = combine(run(flat, flat_chosen, gate, up, down, ep).reshape(bl, ll, k, d), weights)
        return out if split else jax.lax.psum(out, EXPERT_AXIS)

    return jax.shard_map(body, mesh=mesh, in_specs=(tokens, ids, ids, experts, experts, experts),
                         out_specs=tokens)(x, chosen, weights, gate, up, down)


# ----------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------


class MoE(nnx.Module):
    """A block's Mixture-of-Experts MLP: `router` [d, E], `expert_bias` [E] (router_expert_bias), the routed
    experts `gate` / `up` [E, d, f] and `down` [E, f, d], and the shared experts `shared_gate` / `shared_up`
    [d, s], `shared_down` [s, d] (s = num_shared_experts * f). `depth_scale` scales the output projections' init
    as the dense MLP's."""

    def __init__(self, config: LLaDAConfig, depth_scale, *, rngs: nnx.Rngs):
        c = config
        d, e, f = c.d_model, c.num_experts, c.expert_hidden_size
        pd = dtype(c.param_dtype)
        self.config = c
        self.router = param(trunc_normal(rngs, (d, e), d**-0.5, pd), ("embed", None))
        if c.router_expert_bias:
            # Float32 whatever the param dtype (small updates of a balancing rule). It takes part in the choice only,
            # so its gradient is zero; named like the norms' gains, it is replicated and has no weight decay.
            self.expert_bias = param(jnp.zeros((e,), jnp.float32), ("norm",))
        self.gate = param(trunc_normal(rngs, (e, d, f), d**-0.5, pd), ("exp", "embed", "expert_mlp"))
        self.up = param(trunc_normal(rngs, (e, d, f), d**-0.5, pd), ("exp", "embed", "expert_mlp"))
        self.down = param(trunc_normal(rngs, (e, f, d), f**-0.5 * depth_scale, pd), ("exp", "expert_mlp", "embed"))
        if c.num_shared_experts:
            s = c.num_shared_experts * f
            self.shared_gate = param(trunc_normal(rngs, (d, s), d**-0.5, pd), ("embed", "mlp"))
            self.shared_up = param(trunc_normal(rngs, (d, s), d**-0.5, pd), ("embed", "mlp"))
            self.shared_down = param(trunc_normal(rngs, (s, d), s**-0.5 * depth_scale, pd), ("mlp", "embed"))

    def route(self, h: Array) -> tuple[Array, Array, Array]:
        """(chosen [B, L, k], weights [B, L, k], logits [B * L, E]) for h [B, L, d]: float32 logits of float32
        inputs and weights."""
        b, length, d = h.shape
        logits = dense(h.astype(jnp.float32), self.router[...].astype(jnp.float32)).reshape(b * length, -1)
        bias = self.expert_bias[...] if self.config.router_expert_bias else None
        chosen, weights = route(logits, self.config, bias)
        return chosen.reshape(b, length, -1), weights.reshape(b, length, -1), logits

    def __call__(self, h: Array, project, valid: Array | None = None) -> tuple[Array, RouterStats]:
        """(the MLP's output [B, L, d], the router's `RouterStats` over this call's tokens, or those where `valid`
        [B, L] when given) of h [B, L, d]; `project` (name, x) -> x W runs a shared-expert projection of the block
        (with its LoRA adapter when it has one)."""
        c = self.config
        dt = dtype(c.dtype)
        chosen, weights, logits = self.route(h)
        out = routed_experts(h, chosen, weights, *(getattr(self, n)[...].astype(dt) for n in ("gate", "up", "down")))
        if c.num_shared_experts:
            hidden = jax.nn.silu(project("shared_gate", h)) * project("shared_up", h)
            out = out + project("shared_down", sharding.constrain(hidden, ("batch", "length", "mlp")))
        valid = None if valid is None else valid.reshape(-1)
        return out, router_stats(logits, chosen.reshape(-1, chosen.shape[-1]), c, valid)
