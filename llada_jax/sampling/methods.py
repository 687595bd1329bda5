"""The sampling methods: short drivers that loop `step.step` over blocks, with the network call of `network`.

The sequence starts as the prompt followed by `gen_length` mask tokens. Blocks of `block_length` positions
are decoded left to right with `steps // num_blocks` steps each.

- `fixed_length`: one block of `gen_length` (block_length is ignored).
- `semi_ar_padding`: the whole masked answer is present from the start; blocks are decoded left to right
  (`lax.fori_loop`; unrolled, one program section per block, with the prefix cache, whose window shrinks).
- `semi_ar_origin`: the answer grows block by block. The buffer has the full size from the start, but the
  not-yet-extended blocks are hidden from attention (attention_mask 0), so the model sees exactly the
  prompt plus the blocks decoded so far plus the current block. A row stops after the first block that
  contains EOS; the loop (`lax.while_loop`) ends when every row has stopped or all blocks are done. In the
  result every token after a row's first generated EOS, and every never-decoded position, is EOS.
- `block_diffusion` (a block_causal model only; the blocks are the model's `block_size`): blocks left to right
  with the step rules above and semi_ar_origin's EOS stop and EOS fill; the model's own attention hides the
  positions after the block. With the exact prefix cache (`network.BlockCache`, the default), one pass fills the
  cache before the first block, every step runs the block alone against it, and once a block is final (and
  another follows) its keys and values are written in once. Only generated positions are decoded: the prompt
  is the clean context of the cache, so a mask token in it stays.

Within a block (`decode_block`), the schedule runs its steps in a `lax.fori_loop`. With a `threshold` the
block's steps run in a `lax.while_loop` until no row has a mask left in the block (at most block_length
steps; `steps` is not used); a row whose block is done takes no part in the remaining steps of that block.
The noise of step i of block n is keyed by n * steps_per_block + i (block_length with a threshold), so each
row's result does not depend on the other rows of the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.model import KVCache, positions_from_mask
from llada_jax.sampling import schedule
from llada_jax.sampling.network import network
from llada_jax.sampling.options import SamplerOptions
from llada_jax.sampling.step import Context, Place, State, masks_in_block, step


class SampleStats(NamedTuple):
    """What a sampling call spent.

    `nfe[b]` is the number of network evaluations spent on row b, i.e. denoising steps run for that row,
    times 2 with CFG (the conditional and the unconditional sequence are both evaluated); for
    `semi_ar_origin` and `block_diffusion` it counts only the blocks the row actually decoded, with a threshold
    only the steps the row took part in. A cached (windowed) step counts like a full one: one evaluation of the
    network, on fewer positions. `forward_calls` is the number of batched model calls the program made: the
    steps of the loop, and for block_diffusion's cache also its fill and each finished block's append (which
    are not denoising steps, so nfe leaves them out)."""

    nfe: jax.Array  # int32 [B]: network evaluations per row (x2 with CFG)
    forward_calls: jax.Array  # int32 []: batched model calls (denoising steps run)


def sample(model, prompt_ids: jax.Array, attention_mask: jax.Array | None, keys: jax.Array | None,
           opts: SamplerOptions, record: bool):
    """(ids [B, L], SampleStats, history [slots, B, L] of x after every step, or None unless `record`).
    Traced inside one jitted program; `opts` are resolved."""
    batch, plen = prompt_ids.shape
    layout = opts.layout
    x = jnp.concatenate([prompt_ids, jnp.full((batch, layout.gen_length), opts.mask_id, jnp.int32)], axis=1)
    prompt_valid = jnp.ones_like(prompt_ids, bool) if attention_mask is None else attention_mask.astype(bool)
    valid = jnp.concatenate([prompt_valid, jnp.ones((batch, layout.gen_length), bool)], axis=1)
    generated = jnp.arange(x.shape[1])[None, :] >= plen
    fillable = valid & generated if opts.method == "block_diffusion" else valid
    ctx = Context(opts, fillable, positions_from_mask(valid, batch, x.shape[1]), keys)
    # The unconditional CFG input masks the prompt: every position that did not start as a mask.
    prompt = (x != opts.mask_id) & ~generated
    net = network(model, opts, prompt)
    state = State.initial(x, layout.num_blocks * layout.steps_per_block, record)
    attention_mask = None if attention_mask is None else valid.astype(jnp.int32)
    if opts.method == "semi_ar_origin":
        state = semi_ar_origin(state, net, ctx)
    elif opts.method == "block_diffusion":
        state = block_diffusion(state, net, attention_mask, ctx)
    else:  # fixed_length is semi_ar_padding with one block
        state = semi_ar_padding(state, net, attention_mask, ctx)
    return state.x, SampleStats(state.nfe, state.forward_calls), state.history


def semi_ar_padding(state: State, net, attention_mask: jax.Array | None, ctx: Context) -> State:
    every_row = jnp.ones(state.x.shape[:1], bool)
    if net.unrolls_blocks:
        for n in range(ctx.opts.layout.num_blocks):
            state = decode_block(n, state, every_row, attention_mask, net, ctx)
        return state
    return jax.lax.fori_loop(0, ctx.opts.layout.num_blocks,
                             lambda n, s: decode_block(n, s, every_row, attention_mask, net, ctx), state)


def semi_ar_origin(state: State, net, ctx: Context) -> State:
    col = jnp.arange(state.x.shape[1])[None, :]

    def visible(start):  # the prompt, the blocks decoded so far and the current block
        return (ctx.valid & (col < start + ctx.opts.layout.block_length)).astype(jnp.int32)

    return until_eos(state, net, ctx, visible)


def block_diffusion(state: State, net, attention_mask: jax.Array | None, ctx: Context) -> State:
    """The model's block-causal attention hides the positions after the block: the attention mask is the
    sequence's. With the cache (`network.BlockCache`), one pass fills it before the first block."""
    if ctx.opts.cache == "none":
        return until_eos(state, net, ctx, lambda start: attention_mask)
    kv = net.prefill(state.x, attention_mask)
    state = state._replace(forward_calls=state.forward_calls + 1)
    return until_eos(state, net, ctx, lambda start: attention_mask, kv)


def until_eos(state: State, net, ctx: Context, attention_mask_at, kv: KVCache | None = None) -> State:
    """Blocks left to right, a row stopping after its first block that contains EOS, until every row has
    stopped or every block is done; then EOS after each row's first generated EOS and at every position never
    decoded. `attention_mask_at(start)`: the attention mask while the block at `start` is decoded. `kv`:
    block_diffusion's exact cache (`network.BlockCache`), which each finished block is appended to."""
    opts, layout, plen = ctx.opts, ctx.opts.layout, ctx.prompt_length
    col = jnp.arange(state.x.shape[1])[None, :]

    def more(carry):
        n, _, _, active = carry
        return (n < layout.num_blocks) & jnp.any(active)

    def next_block(carry):
        n, state, kv, active = carry
        start = plen + n * layout.block_length
        attention_mask = attention_mask_at(start)
        state = decode_block(n, state, active, attention_mask, net, ctx, kv)
        in_block = (col >= start) & (col < start + layout.block_length)
        active = active & ~jnp.any((state.x == opts.eos_id) & in_block, axis=1)
        if kv is not None:  # the final block's keys and values, once, if a block follows for some row
            def append(state, kv):
                return (state._replace(forward_calls=state.forward_calls + 1),
                        net.append(state.x, attention_mask, kv, start))

            state, kv = jax.lax.cond((n + 1 < layout.num_blocks) & jnp.any(active), append,
                                     lambda state, kv: (state, kv), state, kv)
        return n + 1, state, kv, active

    every_row = jnp.ones(state.x.shape[:1], bool)
    decoded, state, _, _ = jax.lax.while_loop(more, next_block, (jnp.int32(0), state, kv, every_row))
    state = state.hold(decoded * layout.steps_per_block, layout.num_blocks * layout.steps_per_block)
    generated = col >= plen
    eos_seen = jnp.cumsum(((state.x == opts.eos_id) & generated).astype(jnp.int32), axis=1) > 0
    return state._replace(x=jnp.where(generated & (eos_seen | (state.x == opts.mask_id)), opts.eos_id, state.x))


def decode_block(n, state: State, active: jax.Array, attention_mask: jax.Array | None, net, ctx: Context,
                 kv: KVCache | None = None) -> State:
    """Decode block n (a Python int or traced) for the rows in `active`; `kv`: a cache filled before the block
    (block_diffusion's), else the network fills its own at the block's first step, or has none."""
    layout = ctx.opts.layout
    start, per_block = ctx.prompt_length + n * layout.block_length, layout.steps_per_block
    if ctx.opts.threshold is None:
        masked = jnp.where(active, jnp.sum(masks_in_block(state.x, start, ctx), axis=1, dtype=jnp.int32), 0)

        def place(i):
            return Place(start, n * per_block + i, schedule.transfer_count(masked, per_block, i), active)
    else:
        def place(i):
            return Place(start, n * per_block + i, None, active)

    def advance(i, carry, full):
        return _advance(*carry, place(i), full, attention_mask, net, ctx)

    carry, first = (state, kv), 0
    if net.fills_cache:  # the first step of a block fills the cache
        carry, first = advance(0, carry, True), 1
    if ctx.opts.threshold is None:
        return jax.lax.fori_loop(first, per_block, lambda i, c: advance(i, c, net.full_at(i)), carry)[0]

    def unfinished(loop):
        i, (state, _) = loop
        return (i < per_block) & jnp.any(active & jnp.any(masks_in_block(state.x, start, ctx), axis=1))

    i, (state, _) = jax.lax.while_loop(unfinished, lambda loop: (loop[0] + 1, advance(*loop, net.full_at(loop[0]))),
                                       (jnp.int32(first), carry))
    return state.hold(n * per_block + i, (n + 1) * per_block)  # the block's unused step slots


def _advance(state: State, kv, at: Place, full: bool | jax.Array, attention_mask, net, ctx: Context):
    """One step: the network (a full pass, or a window against the cache `kv`), then `step`. (state, kv)."""

    def full_pass():
        out, new_kv = net.full(state.x, attention_mask)
        return step(state, out, at, ctx), new_kv

    def window_pass():
        return step(state, net.window(state.x, attention_mask, kv, at.start), at, ctx), kv

    if isinstance(full, bool):
        return full_pass() if full else window_pass()
    return jax.lax.cond(full, full_pass, window_pass)
