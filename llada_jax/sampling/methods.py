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
- `llada2` (LLaDA 2.x's published generate()): block_diffusion with the blocks laid from position 0, as the
  model was trained, so the first decoded block holds the prompt's last P % block_size tokens (which attend to
  the block's masks, are never changed, and whose keys and values the cache takes from the finished block). In
  the fixed-shape buffer each row is shifted right by its own P % block_size (`_first_block_share`), so that the
  blocks of every row of a left-padded batch fall on the same columns; the generated region is gen_length +
  block_size - 1 rounded up to blocks, a row decodes the blocks that hold its gen_length answer positions, and
  the result is shifted back (prompt, then answer, in the caller's columns).

Within a block (`decode_block`), the schedule runs its steps in a `lax.fori_loop`. With a `threshold` the
block's steps run in a `lax.while_loop`: a row takes part while it has a mask in the block (at most
block_length steps; `steps` is not used). With token editing (`editing_threshold`, LLaDA 2.1) a step also
re-writes committed tokens of the block (`step`), and a row goes on after its last mask is filled for up to
`max_post_steps` steps, until a step edits nothing (block_length + max_post_steps steps at most); rows whose
block is done take no part in its remaining steps. The noise of step i of block n is keyed by
n * steps_per_block + i, so each row's result does not depend on the other rows of the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.model import KVCache, positions_from_mask
from llada_jax.sampling import schedule
from llada_jax.sampling.network import network
from llada_jax.sampling.options import BLOCK_METHODS, SamplerOptions
from llada_jax.sampling.step import Context, Place, State, in_block, masks_in_block, step


class SampleStats(NamedTuple):
    """What a sampling call spent.

    `nfe[b]` is the number of network evaluations spent on row b, i.e. denoising steps run for that row,
    times 2 with CFG (the conditional and the unconditional sequence are both evaluated); for
    `semi_ar_origin` and the block methods it counts only the blocks the row actually decoded, with a threshold
    only the steps the row took part in (with token editing, its editing steps too). A cached (windowed) step
    counts like a full one: one evaluation of the network, on fewer positions. `forward_calls` is the number of
    batched model calls the program made: the steps of the loop, and for the block methods' cache also its fill
    and each finished block's append (which are not denoising steps, so nfe leaves them out)."""

    nfe: jax.Array  # int32 [B]: network evaluations per row (x2 with CFG)
    forward_calls: jax.Array  # int32 []: batched model calls (denoising steps run)


def sample(model, prompt_ids: jax.Array, attention_mask: jax.Array | None, keys: jax.Array | None,
           opts: SamplerOptions, record: bool):
    """(ids [B, P + gen_length], SampleStats, history [slots, B, P + gen_length] of x after every step, or None
    unless `record`). Traced inside one jitted program; `opts` are resolved."""
    batch, plen = prompt_ids.shape
    layout = opts.layout
    length = plen + layout.gen_length
    prompt_valid = jnp.ones_like(prompt_ids, bool) if attention_mask is None else attention_mask.astype(bool)
    shift = _first_block_share(prompt_valid, opts)
    # Row b's prompt sits at columns shift[b] .. shift[b] + plen - 1: its last shift[b] tokens in the first block.
    source = jnp.arange(length)[None, :] - shift[:, None]  # the prompt column a column holds, when < plen
    generated = source >= plen
    held = jnp.clip(source, 0, plen - 1)
    x = jnp.where(generated | (source < 0), opts.mask_id, jnp.take_along_axis(prompt_ids, held, axis=1))
    valid = generated | (source >= 0) & jnp.take_along_axis(prompt_valid, held, axis=1)
    answer = generated & (source < plen + opts.gen_length)
    fillable = valid & generated if opts.method in BLOCK_METHODS else valid
    ctx = Context(opts, fillable, positions_from_mask(valid, batch, length), keys, answer)
    # The unconditional CFG input masks the prompt: every position that did not start as a mask.
    prompt = (x != opts.mask_id) & ~generated
    net = network(model, opts, prompt)
    state = State.initial(x, layout.num_blocks * layout.steps_per_block, record)
    # (without a mask, llada2 shifts every row alike: by plen % block_length, which needs one when not 0)
    needs_mask = attention_mask is not None or opts.method == "llada2" and plen % layout.block_length
    attention_mask = valid.astype(jnp.int32) if needs_mask else None
    if opts.method == "semi_ar_origin":
        state = semi_ar_origin(state, net, ctx)
    elif opts.method in BLOCK_METHODS:
        state = block_diffusion(state, net, attention_mask, ctx)
    else:  # fixed_length is semi_ar_padding with one block
        state = semi_ar_padding(state, net, attention_mask, ctx)
    x, history = state.x, state.history
    if opts.method == "llada2":  # each row's prompt and answer, back in the caller's columns
        columns = jnp.arange(plen + opts.gen_length)[None, :] + shift[:, None]
        x = jnp.take_along_axis(x, columns, axis=1)
        history = None if history is None else jnp.take_along_axis(history, columns[None], axis=2)
    return x, SampleStats(state.nfe, state.forward_calls), history


def _first_block_share(prompt_valid: jax.Array, opts: SamplerOptions) -> jax.Array:
    """int32 [B]: how many of each row's prompt tokens share the first decoded block with its answer. llada2 lays
    the blocks from position 0 (as LLaDA 2.x's generate() and training do): the prompt's last P % block_length
    tokens; every other method starts a block at the prompt's end: none."""
    if opts.method != "llada2":
        return jnp.zeros(prompt_valid.shape[:1], jnp.int32)
    return jnp.sum(prompt_valid, axis=1, dtype=jnp.int32) % opts.layout.block_length


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
        eos = (state.x == opts.eos_id) & ctx.answer & in_block(state.x, start, ctx)
        # a row goes on while it has answer positions after the block (llada2: its own last block) and no EOS
        active = active & ~jnp.any(eos, axis=1) & jnp.any(ctx.answer & (col >= start + layout.block_length), axis=1)
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
    eos_seen = jnp.cumsum(((state.x == opts.eos_id) & ctx.answer).astype(jnp.int32), axis=1) > 0
    return state._replace(x=jnp.where(ctx.answer & (eos_seen | (state.x == opts.mask_id)), opts.eos_id, state.x))


def decode_block(n, state: State, active: jax.Array, attention_mask: jax.Array | None, net, ctx: Context,
                 kv: KVCache | None = None) -> State:
    """Decode block n (a Python int or traced) for the rows in `active`; `kv`: a cache filled before the block
    (block_diffusion's), else the network fills its own at the block's first step, or has none."""
    layout = ctx.opts.layout
    start, per_block = ctx.prompt_length + n * layout.block_length, layout.steps_per_block
    if ctx.opts.threshold is None:  # the schedule's k tokens at each of the block's steps
        masked = jnp.where(active, jnp.sum(masks_in_block(state.x, start, ctx), axis=1, dtype=jnp.int32), 0)

        def advance(i, carry, full):
            at = Place(start, n * per_block + i, schedule.transfer_count(masked, per_block, i), active)
            return _advance(*carry, at, full, attention_mask, net, ctx)

        carry, first = (state, kv), 0
        if net.fills_cache:  # the first step of a block fills the cache
            carry, first = advance(0, carry, True), 1
        return jax.lax.fori_loop(first, per_block, lambda i, c: advance(i, c, net.full_at(i)), carry)[0]

    # Threshold decoding: a row takes part in a step while it has a mask in the block, and with token editing
    # (LLaDA 2.1) also for up to post_steps more steps once it has none, until a step edits nothing.
    post_steps = ctx.opts.post_steps

    def taking_part(x, post, done):
        """(rows in the next step, rows that have a mask in the block)."""
        masks = jnp.any(masks_in_block(x, start, ctx), axis=1)
        return active & ~done & (post + ~masks <= post_steps), masks

    def threshold_step(i, carry, post, done, full):
        state, kv = carry
        rows, masks = taking_part(state.x, post, done)
        new, kv = _advance(state, kv, Place(start, n * per_block + i, None, rows), full, attention_mask, net, ctx)
        edited = jnp.any((new.x != state.x) & (state.x != ctx.opts.mask_id), axis=1)
        return (new, kv), jnp.where(rows, post + ~masks, post), done | ~rows | (~masks & ~edited)

    loop = (jnp.int32(0), (state, kv), jnp.zeros_like(active, jnp.int32), jnp.zeros_like(active))
    if net.fills_cache:  # the first step of a block fills the cache
        loop = (jnp.int32(1), *threshold_step(0, *loop[1:], True))

    def unfinished(loop):
        i, (state, _), post, done = loop
        return (i < per_block) & jnp.any(taking_part(state.x, post, done)[0])

    def body(loop):
        i, carry, post, done = loop
        return (i + 1, *threshold_step(i, carry, post, done, net.full_at(i)))

    i, (state, _), _, _ = jax.lax.while_loop(unfinished, body, loop)
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
