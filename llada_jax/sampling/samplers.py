"""The LLaDA samplers as single jitted programs: `generate`, `create_sampler`, `Sampler`.

A call runs one `jax.jit` program (`program`) built from the pieces of this package: the options
(`options`), one denoising step (`step`), the network call (`network`) and the per-method drivers
(`methods`, where the methods are described). Every loop is a `lax.fori_loop` / `lax.while_loop` with per-row
k as arrays: no Python and no host round trip per step. The program is cached by (model structure, options,
shapes), so a second call with the same shapes does not recompile. With a mesh, the parameters are placed
by their logical axes and the batch is sharded over the data-parallel axes (padded with copies of row 0 to a
multiple of their size; the extra rows are dropped from the result).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from llada_jax import sharding
from llada_jax.sampling import methods, noise
from llada_jax.sampling.methods import SampleStats
from llada_jax.sampling.options import (BLOCK_METHODS, MAX_POST_STEPS, METHODS, REMASKING, SamplerOptions,
                                        prompt_bucket)

__all__ = ["BLOCK_METHODS", "METHODS", "REMASKING", "SampleStats", "Sampler", "SamplerOptions", "create_sampler",
           "generate", "program"]


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
        pad = 0
        if opts.prompt_buckets:  # always with a mask: one program per bucket, padded or not
            length = prompt_ids.shape[1]
            pad = prompt_bucket(length, opts.gen_length, model.config.max_sequence_length) - length
            prompt_ids, attention_mask = _left_pad(prompt_ids, attention_mask, pad, opts.mask_id)
        keys = noise.row_keys(rng, prompt_ids.shape[0]) if opts.needs_rng else None
        graphdef, state = nnx.split(model)
        run = functools.partial(program, opts=opts, record=return_history)
        if self.mesh is None:
            ids, stats, history = run(graphdef, state, prompt_ids, attention_mask, keys)
        else:
            ids, stats, history = self._run_sharded(run, graphdef, state, prompt_ids, attention_mask, keys)
        if pad:  # the bucket's padding out: the caller's columns
            ids = ids[:, pad:]
            history = None if history is None else history[:, :, pad:]
        out = (ids,)
        if return_stats:
            out += (stats,)
        if return_history:
            out += (history,)
        return out if len(out) > 1 else ids

    def _run_sharded(self, run, graphdef, state, prompt_ids, attention_mask, keys):
        """The program on the mesh: parameters laid out by the logical-axis rules, the batch over the data axes
        (padded with copies of row 0 to a multiple of their size), across every process of the mesh. The result is
        a global array laid out like the batch (`sharding.fetch` gives all of it to every process)."""
        mesh, rules = self.mesh, self.rules or sharding.current_rules()
        batch = prompt_ids.shape[0]
        extra = -batch % sharding.data_parallel_size(rules, mesh)

        def rows(a, ndim):  # the same host array on every process -> rows split over the data axes
            a = np.asarray(a)
            if extra:
                a = np.concatenate([a, np.repeat(a[:1], extra, axis=0)], axis=0)
            spec = sharding.batch_spec(rules, mesh, ndim)
            return sharding.global_array(a, jax.NamedSharding(mesh, spec))

        state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
        prompt_ids = rows(prompt_ids, 2)
        attention_mask = None if attention_mask is None else rows(attention_mask, 2)
        if keys is not None:
            keys = jax.random.wrap_key_data(rows(jax.random.key_data(keys), 2), impl=jax.random.key_impl(keys))
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            ids, stats, history = run(graphdef, state, prompt_ids, attention_mask, keys)
        if extra:  # the padding rows out (`sharding.fetch` gives the whole result on every process)
            ids, stats = ids[:batch], SampleStats(stats.nfe[:batch], stats.forward_calls)
            history = None if history is None else history[:, :batch]
        return ids, stats, history


def create_sampler(method: str = "semi_ar_padding", *, mesh=None, rules=None, **options) -> Sampler:
    """A `Sampler` for `method` (fixed_length | semi_ar_padding | semi_ar_origin, or block_diffusion | llada2 for a
    block_causal model); `options` are the fields
    of `SamplerOptions` (gen_length, block_length, steps, temperature, cfg_scale, remasking, mask_id, eos_id,
    eot_id, logits_eos_inf, confidence_eos_eot_inf, threshold, editing_threshold, max_post_steps, cache,
    cache_refresh, prompt_buckets)."""
    known = {f.name for f in dataclasses.fields(SamplerOptions)} - {"method"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"create_sampler: unknown option(s) {unknown}; known options: {sorted(known)}")
    return Sampler(SamplerOptions(method=method, **options), mesh=mesh, rules=rules)


def generate(model, prompt_ids, attention_mask=None, *, method: str = "semi_ar_padding", gen_length: int = 128,
             block_length: int = 32, steps: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", mask_id: int | None = None, eos_id: int | None = None,
             eot_id: int | None = None, logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
             threshold: float | None = None, editing_threshold: float | None = None,
             max_post_steps: int = MAX_POST_STEPS, cache: str | None = None, cache_refresh: int = 0,
             prompt_buckets: bool = True, rng=None, mesh=None, rules=None, return_stats: bool = False,
             return_history: bool = False):
    """Sample answers for a batch of (left-padded) prompts: int32 ids [B, P + gen_length].

    `attention_mask` [B, P] marks real prompt tokens with 1 (left padding 0). The prompts are left-padded further
    to their bucket length (`options.prompt_bucket`; not with `prompt_buckets=False`), so that other prompt
    lengths reuse a few compiled programs: the answer is the same and the result keeps the caller's columns.
    `mask_id` / `eos_id` default to the model config's. `cache` None: "prefix" for the block methods (their exact
    cache), "none" otherwise. `threshold` None: the step schedule (llada2: 0.95, its published default);
    `editing_threshold` (block methods, with a threshold): LLaDA 2.1's token editing, for up to `max_post_steps`
    steps once a block has no mask left. With `return_stats=True` returns `(ids, SampleStats)`, with `return_history=True` also the sequence after every
    step. See `methods` and `step` for the algorithm and `Sampler` for `rng` and `mesh`.
    """
    sampler = create_sampler(
        method, mesh=mesh, rules=rules, gen_length=gen_length, block_length=block_length, steps=steps,
        temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, mask_id=mask_id, eos_id=eos_id,
        eot_id=eot_id, logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
        threshold=threshold, editing_threshold=editing_threshold, max_post_steps=max_post_steps, cache=cache,
        cache_refresh=cache_refresh, prompt_buckets=prompt_buckets)
    return sampler(model, prompt_ids, attention_mask, rng=rng, return_stats=return_stats,
                   return_history=return_history)


def _check_prompt(prompt_ids, attention_mask, opts: SamplerOptions, config):
    prompt_ids = np.asarray(prompt_ids)  # on the host until the program's call (lists, numpy, torch CPU tensors)
    if prompt_ids.ndim != 2 or not np.issubdtype(prompt_ids.dtype, np.integer):
        raise ValueError(f"prompt_ids: expected integer token ids [batch, length], got {prompt_ids.dtype} "
                         f"{prompt_ids.shape}")
    if prompt_ids.shape[0] == 0:
        raise ValueError("prompt_ids: the batch is empty")
    total = prompt_ids.shape[1] + opts.gen_length
    if total > config.max_sequence_length:
        raise ValueError(f"prompt length {prompt_ids.shape[1]} + gen_length {opts.gen_length} = {total} tokens "
                         f"exceeds the model's max_sequence_length {config.max_sequence_length}")
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask: shape {attention_mask.shape} differs from prompt_ids "
                             f"{prompt_ids.shape}")
        attention_mask = attention_mask.astype(np.int32)
    return prompt_ids.astype(np.int32), attention_mask


def _left_pad(prompt_ids: jax.Array, attention_mask: jax.Array | None, pad: int, fill: int):
    """`pad` columns of padding on the left: attention_mask 0 there, so the positions (counted over real tokens),
    the attention and the answer are those of the unpadded prompt."""
    if attention_mask is None:
        attention_mask = np.ones_like(prompt_ids)
    widths = ((0, 0), (pad, 0))
    return np.pad(prompt_ids, widths, constant_values=fill), np.pad(attention_mask, widths)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "record"))
def program(graphdef, state, prompt_ids, attention_mask, keys, *, opts: SamplerOptions, record: bool = False):
    """One sampling call, compiled once per (graphdef, resolved options, shapes): (ids [B, L], SampleStats,
    history [steps, B, L] of x after every step, or None unless `record`)."""
    return methods.sample(nnx.merge(graphdef, state), prompt_ids, attention_mask, keys, opts, record)
