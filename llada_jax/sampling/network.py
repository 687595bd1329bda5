"""The network call of a denoising step, chosen once per sampling call: `network(model, opts, prompt)`.

`Forward` runs the whole sequence at every step. `CachedForward` (Fast-dLLM's `cache` = "prefix" | "dual")
makes the first step of each block a full pass that also fills a KV cache of the whole sequence
(`model.hidden_states_and_kv`); the block's other steps run only a window against it
(`model.hidden_states_from_kv`): the block and every position after it (prefix), or the block alone (dual,
and for `semi_ar_origin`, whose later positions are hidden). `cache_refresh` = r > 0 makes every r-th step of
a block a full, cache-refreshing pass (r = 1: every step, the uncached result). A windowed step only sees the
block's logits, so a mask before the block (in a prompt) is filled at full steps only. With the prefix cache
the window shrinks from block to block, so the drivers unroll the blocks (`unrolls_blocks`).

`BlockCache` is block_diffusion's exact cache on a block_causal model: the keys and values of the prompt and of
each finished block are computed once and never change (nothing after a block is visible to it), so every step
runs the current block alone against the cache, with the same numbers as `Forward`. A block_causal model's blocks
are laid from the start of the generated region (`block_anchor`).

All apply classifier-free guidance the same way (`Guidance`): the unconditional input is x with the prompt
replaced by masks, both halves run as one batch of 2B, and logits = un + (cfg_scale + 1) (cond - un).

A call returns an `Output`: the final residual stream of the positions it ran, with the logits computed on
demand for the positions asked (`logits(start, size)`). A step commits only positions of the current block, so
it asks for the block's logits alone (the output head and its softmax over the vocabulary are most of a step's
work for a small model with a real vocabulary: 8.2M of 11.6M multiply-adds per position for d_model 256, four
layers and 32,000 tokens), and for every position only when a mask before the block remains (a mask in a
prompt). The logits are aligned with the positions they predict (logits[i] is the prediction for position i):
for a `shift_logits` model (the prediction for i read from the output at i - 1) `Output.logits` reads the stream
one position to the left, and a window against the cache starts one position before the block to have it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.model import KVCache, prediction_sources
from llada_jax.sampling.options import SamplerOptions


class Output(NamedTuple):
    """What the network produced at one step: `hidden` [rows, n, D] of the positions first .. first + n - 1 (the
    whole sequence for a full pass; the window against the cache otherwise), rows = 2B with CFG."""

    hidden: jax.Array
    first: int | jax.Array
    model: object
    guidance: "Guidance"
    windowed: bool = False  # a window against the cache: only the block's logits can be asked for
    attention_mask: jax.Array | None = None  # [rows, L] of the whole sequence (for shift_logits)

    def logits(self, start, size: int) -> jax.Array:
        """float32 guided logits [B, size, V] of positions start .. start + size - 1 (`start` may be traced)."""
        if self.model.config.shift_logits:  # position i from the stream at i - 1 (a row's first token: its own)
            at = prediction_sources(self.attention_mask, start + jnp.arange(size), self.hidden.shape[0]) - self.first
            hidden = jnp.take_along_axis(self.hidden, at[..., None], axis=1, mode="clip")
        else:
            hidden = jax.lax.dynamic_slice_in_dim(self.hidden, start - self.first, size, axis=1)
        return self.guidance.combine(self.model.logits(hidden))


class Guidance(NamedTuple):
    """Classifier-free guidance (a scale of 0: none)."""

    scale: float
    prompt: jax.Array  # bool [B, L]: the positions masked in the unconditional input
    mask_id: int

    def inputs(self, x: jax.Array, attention_mask: jax.Array | None):
        """The rows the network sees: x, and with guidance also x with the prompt masked (one batch of 2B)."""
        if self.scale == 0:
            return x, attention_mask
        both_mask = None if attention_mask is None else jnp.concatenate([attention_mask] * 2, axis=0)
        return jnp.concatenate([x, jnp.where(self.prompt, self.mask_id, x)], axis=0), both_mask

    def combine(self, logits: jax.Array) -> jax.Array:
        if self.scale == 0:
            return logits
        cond, uncond = jnp.split(logits, 2, axis=0)
        return uncond + (self.scale + 1.0) * (cond - uncond)


class Forward:
    """A full pass over the whole sequence at every step."""

    fills_cache = False  # the first step of a block is not special
    unrolls_blocks = False

    def __init__(self, model, guidance: Guidance, block_anchor: int | None = None):
        self.model, self.guidance = model, guidance
        # Only a block_causal model takes an anchor; other models are called as they always were.
        self.anchor = {} if block_anchor is None else {"block_anchor": block_anchor}

    def full(self, x: jax.Array, attention_mask: jax.Array | None) -> tuple[Output, KVCache | None]:
        """(the whole sequence's output, no cache)."""
        ids, both_mask = self.guidance.inputs(x, attention_mask)
        return Output(self.model.hidden_states(ids, both_mask, **self.anchor), 0, self.model, self.guidance,
                      attention_mask=both_mask), None

    def full_at(self, i) -> bool:
        """Whether step i of a block is a full pass."""
        return True


class CachedForward:
    """A full pass that fills the KV cache at the first step of a block (and at every `refresh`-th step);
    the block's other steps run a window against the cache."""

    fills_cache = True

    def __init__(self, model, guidance: Guidance, *, block_length: int, refresh: int, window_to_end: bool):
        self.model, self.guidance = model, guidance
        self.block_length, self.refresh = block_length, refresh
        # The prefix cache's window is the block and everything after it: its size depends on the block, so
        # the block index must be a Python int.
        self.unrolls_blocks = window_to_end

    def full(self, x: jax.Array, attention_mask: jax.Array | None) -> tuple[Output, KVCache]:
        """(the whole sequence's output, the KV cache of the whole sequence)."""
        ids, both_mask = self.guidance.inputs(x, attention_mask)
        hidden, kv = self.model.hidden_states_and_kv(ids, both_mask)
        return Output(hidden, 0, self.model, self.guidance, attention_mask=both_mask), kv

    def window(self, x: jax.Array, attention_mask: jax.Array | None, kv: KVCache, start) -> Output:
        """The output of the block starting at `start` (and, with the prefix cache, the positions after it), run
        against the cache `kv`; for a `shift_logits` model from the position before the block."""
        ids, both_mask = self.guidance.inputs(x, attention_mask)
        shift = int(self.model.config.shift_logits)
        if self.unrolls_blocks:  # start is a Python int
            first = max(start - shift, 0)
            size = ids.shape[1] - first
        else:
            first = jnp.maximum(start - shift, 0) if shift else start
            size = min(self.block_length + shift, ids.shape[1])
        window = jax.lax.dynamic_slice_in_dim(ids, first, size, axis=1)
        hidden = self.model.hidden_states_from_kv(window, first, kv, both_mask)
        return Output(hidden[:, :self.block_length + shift], first, self.model, self.guidance, windowed=True,
                      attention_mask=both_mask)

    def full_at(self, i) -> bool | jax.Array:
        """Whether step i > 0 of a block is a full, cache-refreshing pass (step 0 always is)."""
        if self.refresh == 1:
            return True
        if self.refresh == 0:
            return False
        return i % self.refresh == 0


class BlockCache:
    """block_diffusion's exact KV cache. Under block-causal attention a position sees its own block and the
    blocks before it, so the keys and values of the clean prompt and of a finished block never change: `prefill`
    computes them once for the prompt (one full pass), `append` once for each finished block (from its final
    tokens), and each step runs the current block alone against the cache (`window`). The cache rows after the
    block hold stale keys (the fill's masks) that the block cannot see, so a step's numbers are the full pass's."""

    fills_cache = False  # filled once before the first block (`prefill`), not at each block's first step
    unrolls_blocks = False  # the window is always the block: one size, a loop over blocks

    def __init__(self, model, guidance: Guidance, *, block_length: int, block_anchor: int):
        self.model, self.guidance = model, guidance
        self.block_length, self.anchor = block_length, block_anchor

    def prefill(self, x: jax.Array, attention_mask: jax.Array | None) -> KVCache:
        """The cache of the sequence (prompt and masks), of which the prompt's part is final."""
        ids, both_mask = self.guidance.inputs(x, attention_mask)
        return self.model.hidden_states_and_kv(ids, both_mask, block_anchor=self.anchor)[1]

    def window(self, x: jax.Array, attention_mask: jax.Array | None, kv: KVCache, start) -> Output:
        """The output of the block starting at `start` against the cache."""
        hidden, _, both_mask = self._block(x, attention_mask, kv, start)
        return Output(hidden, start, self.model, self.guidance, windowed=True, attention_mask=both_mask)

    def append(self, x: jax.Array, attention_mask: jax.Array | None, kv: KVCache, start) -> KVCache:
        """`kv` with the keys and values of the finished block at `start` (its final tokens in x) written in."""
        fresh = self._block(x, attention_mask, kv, start)[1]
        return KVCache(*(jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), start, axis=2)
                         for old, new in zip(kv, fresh)))

    def full_at(self, i) -> bool:
        """Every step is a window: the cache is exact."""
        return False

    def _block(self, x, attention_mask, kv, start):
        """(hidden [rows, block, D], the block's KVCache, the rows' attention mask) of the block at `start`."""
        ids, both_mask = self.guidance.inputs(x, attention_mask)
        window = jax.lax.dynamic_slice_in_dim(ids, start, self.block_length, axis=1)
        hidden, fresh = self.model.window_and_kv(window, start, kv, both_mask, block_anchor=self.anchor)
        return hidden, fresh, both_mask


def network(model, opts: SamplerOptions, prompt: jax.Array) -> Forward | CachedForward | BlockCache:
    """The network call `opts` ask for; `prompt` bool [B, L] marks what the unconditional CFG input masks."""
    guidance = Guidance(opts.cfg_scale, prompt, opts.mask_id)
    # A block_causal model lays its blocks from the start of the generated region (the same column for every row
    # of a left-padded batch): the end of the prompt, so generation starts a block, or for llada2 the start of the
    # block that holds the prompt's tail (`methods.sample` shifts each row so that its blocks fall from position 0).
    anchor = prompt.shape[1] - opts.layout.gen_length if model.config.attention_type == "block_causal" else None
    if opts.cache == "none":
        return Forward(model, guidance, anchor)
    if anchor is not None:
        return BlockCache(model, guidance, block_length=opts.layout.block_length, block_anchor=anchor)
    # semi_ar_origin hides the positions after the block: its window is the block with either cache
    return CachedForward(model, guidance, block_length=opts.layout.block_length, refresh=opts.cache_refresh,
                         window_to_end=opts.cache == "prefix" and opts.method != "semi_ar_origin")
