"""The LLaDA samplers as single jitted programs: `generate`, `create_sampler`, `Sampler`.

The sequence starts as the prompt followed by `gen_length` mask tokens. Blocks of `block_length` positions
are decoded left to right with `steps // num_blocks` steps each; the number of tokens committed per step
comes from `schedule` (per row, from the masks in the block when the block starts). One step, as in the
official `generate.py`:

    logits      = model(x)                         (with CFG: un + (cfg_scale + 1) (cond - un), where the
                                                    unconditional input has the prompt replaced by masks;
                                                    both halves run as one batch of 2B)
    x0          = argmax(logits [+ T * Gumbel])     (`remasking.predict`)
    confidence  = softmax(logits)[x0]  or  U[0, 1)  (low_confidence / random)
    confidence  = -inf beyond the current block, and wherever x is not a mask
    x           = x0 at the k most confident positions (per row), x elsewhere

Masked positions are every mask token of a real (attention_mask = 1) position, so mask tokens inside a
prompt are filled too, exactly as the official sampler does. Committed tokens never change.

Methods:
- `fixed_length`: one block of `gen_length` (block_length is ignored).
- `semi_ar_padding`: the whole masked answer is present from the start; blocks are decoded left to right.
- `semi_ar_origin`: the answer grows block by block. The buffer has the full size from the start, but the
  not-yet-extended blocks are hidden from attention (attention_mask 0), so the model sees exactly the
  prompt plus the blocks decoded so far plus the current block. A row stops after the first block that
  contains EOS; the loop (`lax.while_loop`) ends when every row has stopped or all blocks are done. In the
  result every token after a row's first generated EOS, and every never-decoded position, is EOS.

Everything runs inside one `jax.jit` program (`lax.fori_loop` / `lax.while_loop`, per-row k as arrays): no
Python and no host round trip per step. The program is cached by (model structure, options, shapes), so a
second call with the same shapes does not recompile. With a mesh, the parameters are placed by their logical
axes and the batch is sharded over the data-parallel axes (padded with copies of row 0 to a multiple of
their size; the extra rows are dropped from the result).

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

Fast decoding (Fast-dLLM; both options work with every method, remasking strategy and CFG):
- `threshold`: instead of the schedule's k, each step commits every masked position of the current block whose
  confidence is at least `threshold`, and always the most confident one (`remasking.select_threshold`); a
  block's steps run in a `lax.while_loop` until no row has a mask left in the block (at most block_length
  steps; `steps` is not used). A row whose block is done takes no part in the remaining steps of that block.
  The noise of step i of block n is keyed by n * block_length + i, so each row's result does not depend on
  the other rows of the batch.
- `cache` = "prefix" | "dual": the first step of each block is a full forward pass that also fills a KV cache
  of the whole sequence (`model.hidden_states_and_kv`); the block's other steps run only a window against
  it (`model.hidden_states_from_kv`): the block and every position after it (prefix), or the block alone
  (dual, and for `semi_ar_origin`, whose later positions are hidden). `cache_refresh` = r > 0 makes every
  r-th step of a block a full, cache-refreshing pass (r = 1: every step, the uncached result). Windowed steps
  only decide positions of the block, so a mask before the block (in a prompt) is filled at full steps only.
  With the prefix cache the window shrinks from block to block, so the blocks are unrolled in the program
  (one section per block); otherwise blocks run in a `lax.fori_loop` / `lax.while_loop`.

NFE accounting (`SampleStats`): `nfe[b]` is the number of network evaluations spent on row b, i.e. denoising
steps run for that row, times 2 with CFG (the conditional and the unconditional sequence are both evaluated);
for `semi_ar_origin` it counts only the blocks the row actually decoded, with a threshold only the steps the
row took part in. A cached (windowed) step counts like a full one: one evaluation of the network, on fewer
positions. `forward_calls` is the number of batched model calls the program made (steps of the loop).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import sharding
from llada_jax.model import positions_from_mask
from llada_jax.sampling import noise, remasking, schedule

METHODS = ("fixed_length", "semi_ar_padding", "semi_ar_origin")
REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")
# <|eot_id|> of the official LLaDA-8B tokenizer; used by `confidence_eos_eot_inf` when the model has that
# vocabulary and no eot_id is given.
LLADA_8B_EOT_ID = 126348
LLADA_8B_MASK_ID = 126336

_trace_count = 0


def trace_count() -> int:
    """How many times a sampler program has been traced (compiled) in this process (for tests)."""
    return _trace_count


class SampleStats(NamedTuple):
    nfe: jax.Array  # int32 [B]: network evaluations per row (x2 with CFG)
    forward_calls: jax.Array  # int32 []: batched model calls (denoising steps run)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """One sampler configuration (hashable: it is a static argument of the jitted program)."""

    method: str = "semi_ar_padding"
    gen_length: int = 128
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    mask_id: int | None = None  # None: model.config.mask_token_id
    eos_id: int | None = None  # None: model.config.eos_token_id
    eot_id: int | None = None  # end of turn, for confidence_eos_eot_inf (None: 126348 for the LLaDA-8B vocab)
    logits_eos_inf: bool = False  # never predict EOS (its logit is -inf)
    confidence_eos_eot_inf: bool = False  # EOS / EOT predictions get the lowest confidence (Appendix B.4)
    threshold: float | None = None  # parallel decoding: commit every masked position with confidence >= this
    cache: str = "none"  # KV cache for block decoding: none | prefix | dual
    cache_refresh: int = 0  # with a cache, a full forward (cache refresh) every this many steps; 0: block starts

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown sampling method {self.method!r}; expected one of {list(METHODS)}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking: unknown remasking strategy {self.remasking!r}; "
                             f"expected one of {list(REMASKING)}")
        self.layout  # validates gen_length / block_length / steps
        for name in ("temperature", "cfg_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("mask_id", "eos_id", "eot_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative token id, got {value!r}")
        value = self.threshold
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"threshold must be a finite number >= 0 (or None: the step schedule), got {value!r}")
        if self.cache not in CACHES:
            raise ValueError(f"cache: unknown cache {self.cache!r}; expected one of {list(CACHES)}")
        value = self.cache_refresh
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"cache_refresh must be an integer >= 0 (0: refresh at block starts only), got {value!r}")

    @property
    def layout(self) -> schedule.BlockLayout:
        block = self.gen_length if self.method == "fixed_length" else self.block_length
        if self.method == "fixed_length" and not (isinstance(block, int) and block > 0):
            block = self.block_length  # let BlockLayout name the bad gen_length
        steps = self.steps
        if self.threshold is not None and isinstance(block, int) and block > 0 and isinstance(self.gen_length, int):
            steps = max(1, self.gen_length // block) * block  # steps are not used: at most one step per token
        return schedule.BlockLayout.checked(self.gen_length, block, steps)

    def resolved(self, config) -> "SamplerOptions":
        """These options with the token ids filled in from a model config, and checked against its vocab."""
        mask_id = config.mask_token_id if self.mask_id is None else self.mask_id
        eos_id = config.eos_token_id if self.eos_id is None else self.eos_id
        eot_id = self.eot_id
        if eot_id is None and self.confidence_eos_eot_inf and mask_id == LLADA_8B_MASK_ID \
                and config.padded_vocab_size > LLADA_8B_EOT_ID:
            eot_id = LLADA_8B_EOT_ID
        vocab = config.padded_vocab_size
        for name, value in (("mask_id", mask_id), ("eos_id", eos_id), ("eot_id", eot_id)):
            if value is not None and not 0 <= value < vocab:
                raise ValueError(f"{name} {value} is outside the model's vocabulary [0, {vocab})")
        if mask_id is None:
            raise ValueError("mask_id: the model config has no mask_token_id; pass mask_id")
        if eos_id is None and (self.method == "semi_ar_origin" or self.logits_eos_inf
                               or self.confidence_eos_eot_inf):
            raise ValueError("eos_id: the model config has no eos_token_id; pass eos_id")
        return dataclasses.replace(self, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id,
                                   temperature=float(self.temperature), cfg_scale=float(self.cfg_scale),
                                   threshold=None if self.threshold is None else float(self.threshold))

    @property
    def needs_rng(self) -> bool:
        return self.temperature > 0 or self.remasking == "random"


class Sampler:
    """A reusable sampler: `sampler(model, prompt_ids, attention_mask=None, rng=None, return_stats=False)`.

    Returns int32 ids [B, P + gen_length] (the prompt, then the generated tokens); with `return_stats=True`
    also `SampleStats`, and with `return_history=True` also int32 [steps, B, P + gen_length], the sequence
    after every denoising step (a separate compiled program; for inspection and tests).

    `rng`: an int seed, one PRNG key (row b uses fold_in(key, b)), or one key per row; only used when
    temperature > 0 or with random remasking. `mesh` shards the batch over its data axes (`rules`: the
    logical-axis rules, default the current ones).
    """

    def __init__(self, options: SamplerOptions, *, mesh: jax.sharding.Mesh | None = None, rules=None):
        self.options = options
        self.mesh = mesh
        self.rules = rules

    def __repr__(self) -> str:
        return f"Sampler({self.options})"

    def __call__(self, model, prompt_ids, attention_mask=None, *, rng=None, return_stats: bool = False,
                 return_history: bool = False):
        opts = self.options.resolved(model.config)
        prompt_ids, attention_mask = _check_prompt(prompt_ids, attention_mask, opts, model.config)
        keys = noise.row_keys(rng, prompt_ids.shape[0]) if opts.needs_rng else None
        graphdef, state = nnx.split(model)
        run = functools.partial(_program, opts=opts, record=return_history)
        if self.mesh is None:
            ids, stats, history = run(graphdef, state, prompt_ids, attention_mask, keys)
        else:
            ids, stats, history = self._run_sharded(run, graphdef, state, prompt_ids, attention_mask, keys)
        out = (ids,)
        if return_stats:
            out += (stats,)
        if return_history:
            out += (history,)
        return out if len(out) > 1 else ids

    def _run_sharded(self, run, graphdef, state, prompt_ids, attention_mask, keys):
        mesh, rules = self.mesh, self.rules or sharding.current_rules()
        batch = prompt_ids.shape[0]
        extra = -batch % sharding.data_parallel_size(rules, mesh)
        if extra:
            def pad(a):
                return None if a is None else jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)], axis=0)
            prompt_ids, attention_mask, keys = pad(prompt_ids), pad(attention_mask), pad(keys)
        state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
        spec = sharding.batch_spec(rules, mesh)
        rows = jax.NamedSharding(mesh, spec)
        prompt_ids = jax.device_put(prompt_ids, rows)
        if attention_mask is not None:
            attention_mask = jax.device_put(attention_mask, rows)
        if keys is not None:
            keys = jax.device_put(keys, jax.NamedSharding(mesh, jax.P(spec[0])))
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            ids, stats, history = run(graphdef, state, prompt_ids, attention_mask, keys)
        if history is not None:
            history = history[:, :batch]
        return ids[:batch], SampleStats(stats.nfe[:batch], stats.forward_calls), history


def create_sampler(method: str = "semi_ar_padding", *, mesh=None, rules=None, **options) -> Sampler:
    """A `Sampler` for `method` (fixed_length | semi_ar_padding | semi_ar_origin); `options` are the fields
    of `SamplerOptions` (gen_length, block_length, steps, temperature, cfg_scale, remasking, mask_id, eos_id,
    eot_id, logits_eos_inf, confidence_eos_eot_inf, threshold, cache, cache_refresh)."""
    known = {f.name for f in dataclasses.fields(SamplerOptions)} - {"method"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"create_sampler: unknown option(s) {unknown}; known options: {sorted(known)}")
    return Sampler(SamplerOptions(method=method, **options), mesh=mesh, rules=rules)


def generate(model, prompt_ids, attention_mask=None, *, method: str = "semi_ar_padding", gen_length: int = 128,
             block_length: int = 32, steps: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", mask_id: int | None = None, eos_id: int | None = None,
             eot_id: int | None = None, logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
             threshold: float | None = None, cache: str = "none", cache_refresh: int = 0,
             rng=None, mesh=None, rules=None, return_stats: bool = False, return_history: bool = False):
    """Sample answers for a batch of (left-padded) prompts: int32 ids [B, P + gen_length].

    `attention_mask` [B, P] marks real prompt tokens with 1 (left padding 0). `mask_id` / `eos_id` default to
    the model config's. With `return_stats=True` returns `(ids, SampleStats)`, with `return_history=True`
    also the sequence after every step. See the module docstring for the algorithm and `Sampler` for `rng`
    and `mesh`.
    """
    sampler = create_sampler(
        method, mesh=mesh, rules=rules, gen_length=gen_length, block_length=block_length, steps=steps,
        temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, mask_id=mask_id, eos_id=eos_id,
        eot_id=eot_id, logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
        threshold=threshold, cache=cache, cache_refresh=cache_refresh)
    return sampler(model, prompt_ids, attention_mask, rng=rng, return_stats=return_stats,
                   return_history=return_history)


def _as_array(a) -> jax.Array:
    return a if isinstance(a, jax.Array) else jnp.asarray(np.asarray(a))  # lists, numpy, torch CPU tensors


def _check_prompt(prompt_ids, attention_mask, opts: SamplerOptions, config):
    prompt_ids = _as_array(prompt_ids)
    if prompt_ids.ndim != 2 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"prompt_ids: expected integer token ids [batch, length], got {prompt_ids.dtype} "
                         f"{prompt_ids.shape}")
    if prompt_ids.shape[0] == 0:
        raise ValueError("prompt_ids: the batch is empty")
    total = prompt_ids.shape[1] + opts.gen_length
    if total > config.max_sequence_length:
        raise ValueError(f"prompt length {prompt_ids.shape[1]} + gen_length {opts.gen_length} = {total} tokens "
                         f"exceeds the model's max_sequence_length {config.max_sequence_length}")
    if attention_mask is not None:
        attention_mask = _as_array(attention_mask)
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask: shape {attention_mask.shape} differs from prompt_ids "
                             f"{prompt_ids.shape}")
        attention_mask = attention_mask.astype(jnp.int32)
    return prompt_ids.astype(jnp.int32), attention_mask


# ----------------------------------------------------------------------------------------------------
# The jitted program
# ----------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "record"))
def _program(graphdef, state, prompt_ids, attention_mask, keys, *, opts: SamplerOptions, record: bool = False):
    """(ids [B, L], SampleStats, history [slots, B, L] of x after every step, or None unless `record`)."""
    global _trace_count
    _trace_count += 1
    model = nnx.merge(graphdef, state)
    layout = opts.layout
    batch, plen = prompt_ids.shape
    length = plen + layout.gen_length
    mask_id, block_length, num_blocks = opts.mask_id, layout.block_length, layout.num_blocks
    threshold, cached, refresh = opts.threshold, opts.cache != "none", opts.cache_refresh
    steps_per_block = layout.steps_per_block  # with a threshold: block_length, at most one step per token
    col = jnp.arange(length, dtype=jnp.int32)[None, :]

    x = jnp.concatenate([prompt_ids, jnp.full((batch, layout.gen_length), mask_id, jnp.int32)], axis=1)
    prompt_valid = jnp.ones_like(prompt_ids, bool) if attention_mask is None else attention_mask.astype(bool)
    valid = jnp.concatenate([prompt_valid, jnp.ones((batch, layout.gen_length), bool)], axis=1)
    # The position of each token in its unpadded sequence: keys the random draws (see `noise`).
    positions = positions_from_mask(valid, batch, length)
    # The unconditional CFG input masks the prompt: every position that did not start as a mask.
    prompt_index = (x != mask_id) & (col < plen)
    exclude = tuple(t for t in (opts.eos_id, opts.eot_id) if t is not None) if opts.confidence_eos_eot_inf else ()
    evals_per_step = 2 if opts.cfg_scale > 0 else 1

    # --- the network: plain, filling the KV cache, and a window against the cache -------------------------

    def model_inputs(x, attn):
        """The rows the network sees: x, and with CFG also x with the prompt masked (one batch of 2B)."""
        if opts.cfg_scale > 0:
            both_mask = None if attn is None else jnp.concatenate([attn, attn], axis=0)
            return jnp.concatenate([x, jnp.where(prompt_index, mask_id, x)], axis=0), both_mask
        return x, attn

    def guided(logits):
        if opts.cfg_scale > 0:
            cond, uncond = logits[:batch], logits[batch:]
            return uncond + (opts.cfg_scale + 1.0) * (cond - uncond)
        return logits

    def forward(x, attn):
        return guided(model(*model_inputs(x, attn))), None

    def forward_fill(x, attn):
        hidden, kv = model.hidden_states_and_kv(*model_inputs(x, attn))
        return guided(model.logits(hidden)), kv

    def forward_window(x, attn, kv, start, size):
        """Logits [B, block_length, V] of the block starting at `start`, running positions start .. start + size
        against the cache `kv`."""
        ids, both_mask = model_inputs(x, attn)
        window = jax.lax.dynamic_slice_in_dim(ids, start, size, axis=1)
        hidden = model.hidden_states_from_kv(window, start, kv, both_mask)
        return guided(model.logits(hidden[:, :block_length]))

    # --- one decision ------------------------------------------------------------------------------------

    def decide(logits, pos, global_step):
        """(x0, confidence) for the positions of `logits` [B, n, V] whose unpadded positions are `pos`."""
        if opts.logits_eos_inf:
            logits = logits.at[..., opts.eos_id].set(-jnp.inf)
        gumbel_keys = None
        if opts.temperature > 0:
            gumbel_keys = noise.step_keys(keys, global_step, noise.GUMBEL_STREAM)
        x0 = remasking.predict(logits, opts.temperature, gumbel_keys, pos)
        if opts.remasking == "low_confidence":
            return x0, remasking.low_confidence(logits, x0, exclude)
        return x0, noise.uniform(noise.step_keys(keys, global_step, noise.RANDOM_STREAM), pos)

    def decide_block(block_logits, x, block_start, global_step):
        """(x0, confidence) [B, L] from the block's logits; -inf confidence outside the block."""
        pos = jax.lax.dynamic_slice_in_dim(positions, block_start, block_length, axis=1)
        x0, conf = decide(block_logits, pos, global_step)
        return (jax.lax.dynamic_update_slice_in_dim(x, x0, block_start, axis=1),
                jax.lax.dynamic_update_slice_in_dim(jnp.full(x.shape, -jnp.inf), conf, block_start, axis=1))

    def decide_full(logits, x, block_start, global_step, active):
        # Only masked positions before the block end can be committed. Usually they all lie in the current
        # block, so x0 and its confidence (and their noise) are computed for the block's positions only;
        # if any row has a mask before the block (a mask token in a prompt, or one left over by an earlier
        # block), for every position. Both give the same decisions (the noise is keyed by position).
        candidates = (x == mask_id) & valid
        early = jnp.any(candidates & (col < block_start) & active[:, None])  # stopped rows commit nothing
        return jax.lax.cond(
            early, lambda: decide(logits, positions, global_step),
            lambda: decide_block(jax.lax.dynamic_slice_in_dim(logits, block_start, block_length, axis=1), x,
                                 block_start, global_step))

    def commit(x, x0, confidence, block_end, k, go):
        """x with the chosen masked positions before `block_end` set to x0: the k most confident per row, or
        with a threshold every one whose confidence reaches it and always the most confident (rows in `go`)."""
        candidates = (x == mask_id) & valid
        confidence = jnp.where(candidates & (col < block_end), confidence, -jnp.inf)
        x0 = jnp.where(candidates, x0, x)
        if threshold is None:
            chosen = remasking.select_top_k(confidence, k, layout.max_transfer)
        else:
            chosen = remasking.select_threshold(confidence, threshold) & go[:, None]
        return jnp.where(chosen, x0, x)

    # --- one block ---------------------------------------------------------------------------------------

    def decode_block(n, carry, attn, active):
        """Decode block n (a Python int or traced) for the rows in `active`.
        carry: (x, history, nfe [B], forward_calls)."""
        start = plen + n * block_length
        end = start + block_length
        in_block = (col >= start) & (col < end)
        # With a prefix cache the window is the block and everything after it (static size: n is a Python int
        # there, see below); with a dual cache, or when the positions after the block are hidden
        # (semi_ar_origin), only the block.
        window = length - start if opts.cache == "prefix" and opts.method != "semi_ar_origin" else block_length
        masked = jnp.sum((carry[0] == mask_id) & in_block, axis=1, dtype=jnp.int32)  # per row, at block start
        masked = jnp.where(active, masked, 0)

        def go_rows(x):  # rows that take part in this step
            if threshold is None:
                return active
            return active & jnp.any((x == mask_id) & in_block, axis=1)

        def step(x, kv, i, full: bool | jax.Array):
            t = n * steps_per_block + i
            k = schedule.transfer_count(masked, steps_per_block, i) if threshold is None else None
            go = go_rows(x)

            def full_step():
                logits, new_kv = (forward_fill if cached else forward)(x, attn)
                x0, conf = decide_full(logits, x, start, t, active)
                return commit(x, x0, conf, end, k, go), new_kv

            def partial_step():
                x0, conf = decide_block(forward_window(x, attn, kv, start, window), x, start, t)
                return commit(x, x0, conf, end, k, go), kv

            if isinstance(full, bool):
                x, kv = full_step() if full else partial_step()
            else:
                x, kv = jax.lax.cond(full, full_step, partial_step)
            return x, kv, go

        def counted(state, i, full):
            x, kv, history, nfe, calls = state
            x, kv, go = step(x, kv, i, full)
            if history is not None:
                history = history.at[n * steps_per_block + i].set(x)
            return x, kv, history, nfe + go.astype(jnp.int32) * evals_per_step, calls + 1

        def full_at(i):  # a refresh step of the cache (every step without a cache)
            if not cached or refresh == 1:
                return True
            if refresh == 0:
                return False
            return i % refresh == 0

        x, history, nfe, calls = carry
        state = (x, None, history, nfe, calls)
        first = 0
        if cached:  # the first step of a block fills the cache
            state = counted(state, 0, True)
            first = 1
        if threshold is None:
            state = jax.lax.fori_loop(first, steps_per_block, lambda i, s: counted(s, i, full_at(i)), state)
            x, _, history, nfe, calls = state
        else:
            def more(c):
                i, s = c
                return (i < steps_per_block) & jnp.any(go_rows(s[0]))

            i, state = jax.lax.while_loop(more, lambda c: (c[0] + 1, counted(c[1], c[0], full_at(c[0]))),
                                          (jnp.int32(first), state))
            x, _, history, nfe, calls = state
            if history is not None:  # the block's unused step slots repeat its final state
                slot = jnp.arange(history.shape[0])[:, None, None]
                unused = (slot >= n * steps_per_block + i) & (slot < (n + 1) * steps_per_block)
                history = jnp.where(unused, x[None], history)
        return x, history, nfe, calls

    total_slots = num_blocks * steps_per_block
    history = jnp.zeros((total_slots, batch, length), jnp.int32) if record else None
    all_rows = jnp.ones((batch,), bool)
    zero_nfe, zero_calls = jnp.zeros((batch,), jnp.int32), jnp.int32(0)
    if opts.method in ("fixed_length", "semi_ar_padding"):
        attn = None if attention_mask is None else valid.astype(jnp.int32)
        carry = (x, history, zero_nfe, zero_calls)
        if opts.cache == "prefix":  # the window shrinks block by block: one program section per block
            for n in range(num_blocks):
                carry = decode_block(n, carry, attn, all_rows)
        else:
            carry = jax.lax.fori_loop(0, num_blocks, lambda n, c: decode_block(n, c, attn, all_rows), carry)
        x, history, nfe, calls = carry
        return x, SampleStats(nfe, calls), history

    # semi_ar_origin
    eos_id = opts.eos_id

    def cond(carry):
        n, _, active = carry
        return (n < num_blocks) & jnp.any(active)

    def body(carry):
        n, state, active = carry
        visible = valid & (col < plen + (n + 1) * block_length)
        x, hist, nfe, calls = decode_block(n, state, visible.astype(jnp.int32), active)
        in_block = (col >= plen + n * block_length) & (col < plen + (n + 1) * block_length)
        has_eos = jnp.any((x == eos_id) & in_block, axis=1)
        return n + 1, (x, hist, nfe, calls), active & ~has_eos

    init = (jnp.int32(0), (x, history, zero_nfe, zero_calls), all_rows)
    n_run, (x, history, nfe, calls), _ = jax.lax.while_loop(cond, body, init)
    if history is not None:  # blocks never run repeat the last state
        history = jnp.where((jnp.arange(total_slots) < n_run * steps_per_block)[:, None, None], history, x[None])
    generated = col >= plen
    eos_seen = jnp.cumsum(((x == eos_id) & generated).astype(jnp.int32), axis=1) > 0
    x = jnp.where(generated & (eos_seen | (x == mask_id)), eos_id, x)
    return x, SampleStats(nfe, calls), history
