"""One denoising step, a pure function of (state, network output) -> state.

As in the official `generate.py`, given the logits of the current sequence x (with CFG already applied, see
`network`; they are computed for the current block only, unless a mask before it needs them all):

    x0          = argmax(logits [+ T * Gumbel])     (`remasking.predict`)
    confidence  = softmax(logits)[x0]  or  U[0, 1)  (low_confidence / random)
    confidence  = -inf beyond the current block, and wherever x is not a mask
    x           = x0 at the k most confident positions (per row), x elsewhere

k comes from the schedule (`schedule.transfer_count`, fixed per row when the block starts). Masked positions
are every mask token of a real (attention_mask = 1) position, so mask tokens inside a prompt are filled too,
exactly as the official sampler does (the block methods fill generated positions only: their prompt is the clean
context the blocks attend to). Committed tokens never change (unless token editing is on, below).

Threshold (Fast-dLLM): instead of the schedule's k, the step commits every masked position of the block whose
confidence is at least `threshold`, and always the most confident one (`remasking.select_threshold`), in the
rows that take part in the step (`Place.active`: the driver's choice, see `methods.decode_block`).

Token editing (LLaDA 2.1, `editing_threshold`, the block methods): the same step also replaces each committed
token of the current block (a generated position that was not a mask when the step began; never the prompt) by
the step's x0 where x0 differs from it and its probability (the low-confidence score) is above
`editing_threshold`. Committed tokens change only so.

Appendix B.4 options. `logits_eos_inf` sets the EOS logit to -inf (after CFG, before x0 is drawn).
`confidence_eos_eot_inf` removes EOS and EOT (`<|eot_id|>`) from the softmax that scores x0, so an EOS or EOT
prediction scores 0, below every other masked candidate: such positions are committed only when a step
needs more tokens than the other candidates. That is exactly what the official code computes at temperature
0 (its in-place -inf writes land on the logits the confidence is taken from). At temperature > 0 the
official EOS write lands on the noisy copy instead and only EOT is affected; that artefact is not copied.

Ties. argmax ties go to the lowest token id (as torch.argmax); equal confidences are committed lowest
position first (`lax.top_k`). torch.topk leaves the order of equal values unspecified (on CPU it is not the
lowest index), so exact ties are the one place the official output is not reproducible; with float32
confidences they need saturated probabilities (exactly 1.0) and are rare for sampled text.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.sampling import noise, remasking
from llada_jax.sampling.options import SamplerOptions


class State(NamedTuple):
    """What the sampler carries from step to step."""

    x: jax.Array  # int32 [B, L]: the sequence
    nfe: jax.Array  # int32 [B]: network evaluations spent on each row
    forward_calls: jax.Array  # int32 []: batched network calls
    history: jax.Array | None  # int32 [slots, B, L]: x after every step (slot t: step t), when recording

    @classmethod
    def initial(cls, x: jax.Array, slots: int, record: bool) -> "State":
        history = jnp.zeros((slots,) + x.shape, jnp.int32) if record else None
        return cls(x, jnp.zeros((x.shape[0],), jnp.int32), jnp.int32(0), history)

    def hold(self, first, last) -> "State":
        """History slots first .. last - 1 (steps that never ran) repeat the current x."""
        if self.history is None:
            return self
        slot = jnp.arange(self.history.shape[0])[:, None, None]
        return self._replace(history=jnp.where((slot >= first) & (slot < last), self.x[None], self.history))


class Context(NamedTuple):
    """What every step of one sampling call reads besides the state."""

    opts: SamplerOptions  # resolved (token ids filled in)
    valid: jax.Array  # bool [B, L]: positions a step may fill: real ones (block methods: generated ones)
    positions: jax.Array  # int32 [B, L]: position in the unpadded sequence, which keys the random draws
    keys: jax.Array | None  # [B] row keys (None when nothing is random)
    answer: jax.Array  # bool [B, L]: the gen_length positions after each row's prompt, returned as its answer

    @property
    def prompt_length(self) -> int:
        """Where the generated region (`opts.layout.gen_length` positions) starts: the prompt's end, or for llada2
        the start of the block that holds the prompt's tail."""
        return self.valid.shape[1] - self.opts.layout.gen_length


class Place(NamedTuple):
    """Where a step works."""

    start: int | jax.Array  # first position of the current block
    t: int | jax.Array  # the step's number in the whole program: keys its noise, names its history slot
    k: jax.Array | None  # int32 [B]: tokens each row commits (the schedule); None with a threshold
    active: jax.Array  # bool [B]: rows taking part in the step (the others keep their tokens and spend nothing)


def in_block(x: jax.Array, start, ctx: Context) -> jax.Array:
    """bool [1, L]: the positions of the block that starts at `start`."""
    col = jnp.arange(x.shape[1])[None, :]
    return (col >= start) & (col < start + ctx.opts.layout.block_length)


def masks_in_block(x: jax.Array, start, ctx: Context) -> jax.Array:
    """bool [B, L]: the mask tokens a step may fill in the block that starts at `start`."""
    return (x == ctx.opts.mask_id) & ctx.valid & in_block(x, start, ctx)


def step(state: State, out, at: Place, ctx: Context) -> State:
    """One denoising step from the network's output `out` (`network.Output`) of the whole sequence or of a
    window starting at the block."""
    opts, x = ctx.opts, state.x
    col = jnp.arange(x.shape[1])[None, :]
    masked = (x == opts.mask_id) & ctx.valid
    x0, score = _predict(out, x, masked, at, ctx)
    confidence = jnp.where(masked & (col < at.start + opts.layout.block_length), score, -jnp.inf)
    if opts.threshold is None:
        chosen = remasking.select_top_k(confidence, at.k, opts.layout.max_transfer)
    else:
        chosen = remasking.select_threshold(confidence, opts.threshold) & at.active[:, None]
    if opts.editing_threshold is not None:  # LLaDA 2.1: committed tokens of the block the model now reads otherwise
        committed = ctx.valid & ~masked & in_block(x, at.start, ctx) & at.active[:, None]
        chosen |= committed & (x0 != x) & (score > opts.editing_threshold)
    x = jnp.where(chosen, x0, x)  # else, committed tokens never change
    history = None if state.history is None else state.history.at[at.t].set(x)
    nfe = state.nfe + at.active.astype(jnp.int32) * opts.evaluations_per_step
    return State(x, nfe, state.forward_calls + 1, history)


def _predict(out, x: jax.Array, masked: jax.Array, at: Place, ctx: Context):
    """(x0, confidence) [B, L]; positions not scored get x0 = x and confidence -inf.

    Only masked positions before the block end can be committed. Usually they all lie in the block, so the
    logits, x0 and its confidence (and their noise) are computed for the block's positions only; if any active
    row has a mask before the block (a mask token in a prompt, or one left over by an earlier block) and the
    network ran the whole sequence, for every position. Both give the same decisions (the noise is keyed by
    position)."""
    block_length = ctx.opts.layout.block_length

    def block_only():
        positions = jax.lax.dynamic_slice_in_dim(ctx.positions, at.start, block_length, axis=1)
        x0, confidence = _scored(out.logits(at.start, block_length), positions, at.t, ctx)
        return (jax.lax.dynamic_update_slice_in_dim(x, x0, at.start, axis=1),
                jax.lax.dynamic_update_slice_in_dim(jnp.full(x.shape, -jnp.inf), confidence, at.start, axis=1))

    if out.windowed:  # a window against the cache: the block's logits only
        return block_only()
    col = jnp.arange(x.shape[1])[None, :]
    early = jnp.any(masked & (col < at.start) & at.active[:, None])
    return jax.lax.cond(early, lambda: _scored(out.logits(0, x.shape[1]), ctx.positions, at.t, ctx), block_only)


def _scored(logits: jax.Array, positions: jax.Array, t, ctx: Context):
    """(x0, confidence) of the positions with these logits [B, n, V]; `positions` [B, n] key their noise."""
    opts = ctx.opts
    if opts.logits_eos_inf:
        logits = logits.at[..., opts.eos_id].set(-jnp.inf)
    gumbel_keys = noise.step_keys(ctx.keys, t, noise.GUMBEL_STREAM) if opts.temperature > 0 else None
    x0 = remasking.predict(logits, opts.temperature, gumbel_keys, positions)
    if opts.remasking == "low_confidence":
        return x0, remasking.low_confidence(logits, x0, opts.confidence_excluded_ids)
    return x0, noise.uniform(noise.step_keys(ctx.keys, t, noise.RANDOM_STREAM), positions)
