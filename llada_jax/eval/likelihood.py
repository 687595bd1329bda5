"""Conditional log-likelihood of an answer given a prompt: the LLaDA Monte Carlo estimator, and the greedy check.

`log_likelihood(model, prompt_ids, answer_ids, mc_num=128, batch_size=16, cfg_scale=0.0)` estimates
log p(answer | prompt) with the masked-diffusion bound, as the official `get_log_likelihood` (eval_llada.py)
does. For an answer of L tokens, each of the mc_num / batch_size Monte Carlo batches draws

    k ~ U{1, ..., L}                          (one per batch)
    m_r = ((round(k + r L / batch_size) - 1) mod L) + 1,   r = 0 .. batch_size - 1
                                              (stratified mask counts, spread evenly over 1..L)

and row r masks m_r answer positions chosen uniformly at random (the prompt is never masked). Row r's loss
is the sum over its masked positions of the cross-entropy of the true token divided by m_r / L; the batch's
loss is the mean over its rows, and the estimate is minus the mean over batches. With `cfg_scale > 0` the
logits are un + (cfg_scale + 1)(cond - un), `un` being the model's logits with the prompt masked.

Its expectation is the bound  -E_m [ (L / m) E_{|S| = m} sum_{i in S} CE_i ]  with m distributed as the
stratified counts (uniform on 1..L when L / batch_size rounds without ties); `tests/eval/test_likelihood.py`
computes it exactly over every mask subset of a tiny answer. `return_stderr=True` also gives the Monte Carlo
standard error, std(batch losses) / sqrt(number of batches) (batches are independent; rows within one are not).

Block-causal models (`attention_type="block_causal"`, block diffusion) are scored by the bound of block
diffusion instead (BD3-LM): the answer is cut into blocks of `block_size` laid from the end of the prompt (as
the sampler and SFT lay them; the last block may be shorter), and log p(answer | prompt) >= sum over blocks b
of block b's ELBO given the prompt and the clean blocks before it. Each Monte Carlo row draws, in every block
independently, k_b ~ U{1, ..., n_b} (n_b the block's size) and masks k_b of its positions uniformly at random;
the row's loss is

    sum_b (n_b / k_b) sum_{i masked in block b} CE_i,    CE_i from p(. | noisy block b, clean blocks < b, prompt)

an unbiased estimate of the sum of the per-block bounds (each block's term is the LLaDA estimator of that
block). All blocks are predicted in one forward pass over noisy answer ++ prompt ++ clean answer (x_t ++ x_0
of `llada_jax.diffusion.block_diffusion_pairs`, less the noisy copy of the prompt, which no answer query
sees): noisy block b sees noisy block b, the prompt and the clean blocks before b; both copies of the answer
take the answer's positions. Batches, the estimate (minus the mean over batches) and its standard error are
as above.

`greedy_check(model, prompt_ids, answer_ids)` is the official `suffix_greedy_prediction`: starting from the
prompt and L masks, each step fills the single most confident masked answer position with its argmax (L
steps); the answer is "greedy" when the result equals it. Ties between positions go to the lowest position.
For a block-causal model the same rule runs block by block, as its sampler decodes: each step fills the most
confident masked position of the first block that still has one (the later blocks, masked, are invisible to
it under the block-causal attention laid from the end of the prompt).

Batching. Both functions take one example (two lists of ids) or many (two lists of lists). Examples are sorted
by length and grouped (`examples_per_call` per jitted call; prompt and answer lengths rounded up to a multiple
of 16, so few shapes compile); in a group, prompts are left-padded and answers right-padded, and the padding
is hidden from attention with positions counting real tokens only, so an example gives the same numbers alone
or in any group. Every random draw of example i is keyed by its own key (from `rng` as in the samplers: an
int seed gives example i the key fold_in(key(seed), i)), counted by Monte Carlo batch, row and position.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import sharding
from llada_jax.config import padding_token_id
from llada_jax.diffusion import block_diffusion_pairs, token_cross_entropy
from llada_jax.model import positions_from_mask
from llada_jax.sampling import noise, remasking
from llada_jax.sampling.prompts import LENGTH_BUCKET, left_pad


class Likelihood(NamedTuple):
    log_likelihood: np.ndarray  # float64 [N]: the estimates
    stderr: np.ndarray  # float64 [N]: their Monte Carlo standard errors


def log_likelihood(model, prompt_ids, answer_ids, mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0,
                   *, rng=0, mask_id: int | None = None, examples_per_call: int = 8, return_stderr: bool = False,
                   mesh=None, rules=None):
    """Monte Carlo estimate of log p(answer | prompt) (see the module docstring; a block-causal model is scored
    by the block-diffusion bound).

    `prompt_ids` / `answer_ids`: one example (sequences of ints) or N examples (lists of sequences). Returns a
    float, or float64 [N]; with `return_stderr=True` a `Likelihood` (estimates, standard errors) of floats or
    arrays. An empty answer has log-likelihood 0. `mc_num` must be a multiple of `batch_size` (the official
    assertion); `rng`: an int seed, a key, or one key per example. With `mesh` (and the logical-axis `rules`), the
    parameters are laid out on it and each call's examples split over its data axes (`examples_per_call` is
    rounded up to a multiple of their size), across every process of the mesh.
    """
    single, prompts, answers = _examples(prompt_ids, answer_ids)
    _check_options(mc_num, batch_size, cfg_scale, examples_per_call)
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    _check_lengths(model.config, prompts, answers, mask_id)
    typed_keys = noise.row_keys(rng, len(prompts))
    keys, key_impl = np.asarray(jax.random.key_data(typed_keys)), str(jax.random.key_impl(typed_keys))
    estimates = np.zeros(len(prompts))
    errors = np.zeros(len(prompts))
    run = _Runner(model, mesh, rules)
    examples_per_call = run.round_up(examples_per_call)
    program = _block_likelihood_program if _block_size(model.config) else _likelihood_program
    for rows, batch in _groups(prompts, answers, examples_per_call, model.config):
        row_keys = keys[np.asarray(rows + [rows[0]] * (examples_per_call - len(rows)))]
        losses = run(program, *batch, row_keys, batches=mc_num // batch_size, batch_size=batch_size,
                     cfg_scale=float(cfg_scale), mask_id=mask_id, key_impl=key_impl)
        losses = losses.astype(np.float64)[:, :len(rows)]  # [batches, examples]
        estimates[rows] = -losses.mean(0)
        n = losses.shape[0]
        errors[rows] = losses.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.nan
    if single:
        estimates, errors = float(estimates[0]), float(errors[0])
    return Likelihood(estimates, errors) if return_stderr else estimates


def greedy_check(model, prompt_ids, answer_ids, cfg_scale: float = 0.0, *, mask_id: int | None = None,
                 examples_per_call: int = 8, mesh=None, rules=None):
    """Whether each answer is the greedy decode of its prompt (the official `suffix_greedy_prediction`, one
    committed token per step; block by block for a block-causal model). Returns a bool, or bool [N]. An empty
    answer is greedy. `mesh`: as for `log_likelihood`."""
    single, prompts, answers = _examples(prompt_ids, answer_ids)
    _check_options(1, 1, cfg_scale, examples_per_call)
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    _check_lengths(model.config, prompts, answers, mask_id)
    out = np.ones(len(prompts), bool)
    run = _Runner(model, mesh, rules)
    for rows, batch in _groups(prompts, answers, run.round_up(examples_per_call), model.config):
        ok = run(_greedy_program, *batch, cfg_scale=float(cfg_scale), mask_id=mask_id,
                 block_size=_block_size(model.config))
        out[rows] = ok[:len(rows)]
    return bool(out[0]) if single else out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a text pair, as the official `_encode_pair`: trailing spaces of the context
    move to the continuation, the context is encoded with the tokenizer's special tokens (e.g. BOS), and the
    answer is what encoding context + continuation adds after the context's tokens. `tokenizer`: a
    `TokenizerHelper`."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=True)
    prompt = tokenizer.encode(context, add_special_tokens=True)
    return prompt, whole[len(prompt):]


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def _as_ids(seq, what: str) -> list[int]:
    ids = np.asarray(seq)
    if ids.ndim != 1 or (ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0)):
        raise ValueError(f"{what}: expected a sequence of non-negative token ids")
    return ids.astype(np.int64).tolist()


def _examples(prompt_ids, answer_ids):
    """(single, prompts, answers): lists of id lists."""
    def is_single(x):
        a = np.asarray(x, dtype=object) if isinstance(x, list) else np.asarray(x)
        return a.ndim == 1 and not (len(a) and isinstance(a[0], (list, tuple, np.ndarray)))

    single = is_single(prompt_ids)
    if single != is_single(answer_ids):
        raise ValueError("prompt_ids and answer_ids: give one example (two sequences) or many (two lists of "
                         "sequences)")
    if single:
        prompt_ids, answer_ids = [prompt_ids], [answer_ids]
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} examples but answer_ids has {len(answer_ids)}")
    if not len(prompt_ids):
        raise ValueError("prompt_ids: no examples")
    prompts = [_as_ids(p, f"prompt_ids[{i}]") for i, p in enumerate(prompt_ids)]
    answers = [_as_ids(a, f"answer_ids[{i}]") for i, a in enumerate(answer_ids)]
    return single, prompts, answers


def _check_options(mc_num, batch_size, cfg_scale, examples_per_call):
    for name, value in (("mc_num", mc_num), ("batch_size", batch_size), ("examples_per_call", examples_per_call)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if mc_num % batch_size:
        raise ValueError(f"mc_num {mc_num} must be a multiple of batch_size {batch_size}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not cfg_scale >= 0 \
            or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")


def _check_lengths(config, prompts, answers, mask_id):
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if len(p) + len(a) > config.max_sequence_length:
            raise ValueError(f"example {i}: prompt {len(p)} + answer {len(a)} tokens exceed the model's "
                             f"max_sequence_length {config.max_sequence_length}")
        for name, ids in (("prompt", p), ("answer", a)):
            if ids and max(ids) >= config.padded_vocab_size:
                raise ValueError(f"example {i}: {name} token id {max(ids)} is outside the vocabulary "
                                 f"[0, {config.padded_vocab_size})")
        if mask_id in a:
            raise ValueError(f"example {i}: the answer contains the mask token {mask_id}")


def _block_size(config) -> int | None:
    """The block size of a block-causal model, None for the other attention types."""
    return config.block_size if config.attention_type == "block_causal" else None


def _bucket(n: int) -> int:
    return max(LENGTH_BUCKET, -(-n // LENGTH_BUCKET) * LENGTH_BUCKET)


def _groups(prompts, answers, per_call, config):
    """Yield (example indices, (prompt [E, P], prompt_mask, answer [E, A], answer_lengths [E])) for groups of
    `per_call` examples of similar lengths (the last group padded with copies of its first example). Examples
    with an empty answer are left out."""
    order = sorted((i for i in range(len(prompts)) if answers[i]), key=lambda i: (len(answers[i]), len(prompts[i])))
    for g in range(0, len(order), per_call):
        rows = order[g:g + per_call]
        fill = rows + [rows[0]] * (per_call - len(rows))
        a_len = _bucket(max(len(answers[i]) for i in rows))
        longest = max(len(prompts[i]) for i in rows)
        p_len = max(min(_bucket(longest), config.max_sequence_length - a_len), longest, 1)
        prompt, prompt_mask = left_pad([prompts[i] for i in fill], padding_token_id(config), p_len)
        answer = np.zeros((per_call, a_len), np.int32)
        lengths = np.zeros((per_call,), np.int32)
        for r, i in enumerate(fill):
            answer[r, :len(answers[i])] = answers[i]
            lengths[r] = len(answers[i])
        yield rows, (prompt, prompt_mask, answer, lengths)


class _Runner:
    """Runs the jitted programs on host inputs whose first axis is the examples: on one device, or on a mesh
    (parameters laid out by the rules, the examples split over the data axes, every process of the mesh taking
    part); returns numpy on every process."""

    def __init__(self, model, mesh, rules):
        self.graphdef, state = nnx.split(model)
        self.mesh, self.rules = mesh, tuple(rules or sharding.current_rules())
        self.state = state if mesh is None else jax.device_put(state, sharding.state_shardings(state, mesh,
                                                                                               self.rules))

    def round_up(self, examples: int) -> int:
        """`examples` rounded up to a multiple of the data-parallel size (1 without a mesh)."""
        parallel = 1 if self.mesh is None else sharding.data_parallel_size(self.rules, self.mesh)
        return -(-examples // parallel) * parallel

    def __call__(self, program, *inputs, **static):
        if self.mesh is None:
            return np.asarray(program(self.graphdef, self.state, *map(jnp.asarray, inputs), **static))
        placed = [sharding.global_array(x, jax.NamedSharding(self.mesh, sharding.batch_spec(self.rules, self.mesh,
                                                                                            np.ndim(x))))
                  for x in inputs]
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return sharding.fetch(program(self.graphdef, self.state, *placed, **static))


# ----------------------------------------------------------------------------------------------------
# The jitted programs
# ----------------------------------------------------------------------------------------------------


def mask_counts(k: jax.Array, length: jax.Array, batch_size: int) -> jax.Array:
    """The stratified mask counts [batch_size] of one Monte Carlo batch: ((round(k + r L / b) - 1) mod L) + 1,
    computed like the official torch.linspace(k, k + (b - 1) L / b, b) in float32, rounded half to even."""
    k = k.astype(jnp.float32)
    length_f = length.astype(jnp.float32)
    counts = jnp.round(k + jnp.arange(batch_size, dtype=jnp.float32) * (length_f / batch_size)).astype(jnp.int32)
    return (counts - 1) % length + 1


def _answer_masks(key, length, batch_size: int, width: int):
    """(bool [batch_size, width] masked answer positions, counts [batch_size]) for one example and batch."""
    k = jax.random.randint(jax.random.fold_in(key, 0), (), 1, length + 1)
    counts = mask_counts(k, length, batch_size)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, 1), r))(jnp.arange(batch_size))
    scores = noise.uniform(row_keys, jnp.broadcast_to(jnp.arange(width), (batch_size, width)))
    scores = jnp.where(jnp.arange(width)[None, :] < length, scores, 2.0)  # padding is never masked
    ranks = jnp.argsort(jnp.argsort(scores, axis=1, stable=True), axis=1, stable=True)
    return ranks < counts[:, None], counts


def _guided_answer_logits(model, ids, attn, plen, cfg_scale, mask_id):
    """float32 logits [rows, A, V] of the answer positions (after the first `plen`), with CFG if asked."""
    rows = ids.shape[0]
    if cfg_scale > 0:
        col = jnp.arange(ids.shape[1])[None, :]
        un = jnp.where((col < plen) & (attn > 0), mask_id, ids)
        ids, attn = jnp.concatenate([ids, un]), jnp.concatenate([attn, attn])
    # block_causal: blocks laid from the end of the (left-padded) prompt, where the answer starts
    hidden = model.prediction_states(model.hidden_states(ids, attn, block_anchor=plen), attn)[:, plen:]
    return _guided(model.logits(hidden), rows, cfg_scale)


def _guided(logits, rows: int, cfg_scale: float):
    """The classifier-free-guided logits of `rows` conditional rows followed by their unconditional twins:
    un + (s + 1)(cond - un); `logits` itself without guidance."""
    if cfg_scale <= 0:
        return logits
    cond, un = logits[:rows], logits[rows:]
    return un + (cfg_scale + 1.0) * (cond - un)


@functools.partial(jax.jit, static_argnames=("graphdef", "batches", "batch_size", "cfg_scale", "mask_id",
                                             "key_impl"))
def _likelihood_program(graphdef, state, prompt, prompt_mask, answer, lengths, keys, *, batches: int,
                        batch_size: int, cfg_scale: float, mask_id: int, key_impl: str):
    """Per Monte Carlo batch and example, the batch's mean loss: float32 [batches, E] (`keys`: the raw data of
    keys of the PRNG implementation `key_impl`)."""
    model = nnx.merge(graphdef, state)
    keys = jax.random.wrap_key_data(keys, impl=key_impl)
    examples, plen = prompt.shape
    width = answer.shape[1]
    answer_valid = jnp.arange(width)[None, :] < lengths[:, None]
    attn = jnp.concatenate([prompt_mask, answer_valid.astype(jnp.int32)], axis=1)
    attn = jnp.repeat(attn, batch_size, axis=0)  # [E * b, P + A]

    def one_batch(_, j):
        masked, counts = jax.vmap(lambda key, n: _answer_masks(jax.random.fold_in(key, j), n, batch_size, width))(
            keys, lengths)  # [E, b, A], [E, b]
        noisy = jnp.where(masked, mask_id, answer[:, None, :])
        ids = jnp.concatenate([jnp.repeat(prompt, batch_size, axis=0), noisy.reshape(-1, width)], axis=1)
        logits = _guided_answer_logits(model, ids, attn, plen, cfg_scale, mask_id)
        ce = token_cross_entropy(logits, jnp.repeat(answer, batch_size, axis=0)).reshape(examples, batch_size, width)
        weight = lengths[:, None].astype(jnp.float32) / counts.astype(jnp.float32)  # 1 / (m / L)
        loss = jnp.sum(jnp.where(masked, ce, 0.0), axis=-1) * weight  # [E, b]
        return None, jnp.mean(loss, axis=1)

    _, losses = jax.lax.scan(one_batch, None, jnp.arange(batches))
    return losses


def block_answer_masks(key, length, batch_size: int, width: int, block_size: int):
    """(bool [batch_size, width] masked answer positions, float32 [batch_size, width] weights n_b / k_b of each
    position's block) for one example and Monte Carlo batch of a block-causal model: the answer's `length`
    positions are cut into blocks of `block_size` (the last one n_b <= block_size long), and each row masks, in
    every block independently, k_b ~ U{1, ..., n_b} of its positions chosen uniformly at random. Draws are
    keyed by row and block (the counts) or position (the choice), so they do not depend on `width`."""
    n_blocks = -(-width // block_size)
    sizes = jnp.clip(length - jnp.arange(n_blocks) * block_size, 0, block_size)  # [n_blocks]; 0 past the end

    def count(r, b):
        block_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), r), b)
        return jax.random.randint(block_key, (), 1, jnp.maximum(sizes[b], 1) + 1)

    rows, blocks = jnp.arange(batch_size), jnp.arange(n_blocks)
    counts = jax.vmap(lambda r: jax.vmap(lambda b: count(r, b))(blocks))(rows)  # [batch_size, n_blocks]
    padded = n_blocks * block_size
    row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, 1), r))(rows)
    scores = noise.uniform(row_keys, jnp.broadcast_to(jnp.arange(padded), (batch_size, padded)))
    scores = jnp.where(jnp.arange(padded)[None, :] < length, scores, 2.0)  # padding is never masked
    scores = scores.reshape(batch_size, n_blocks, block_size)
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)  # within each block
    masked = (ranks < counts[:, :, None]) & (scores < 2.0)
    weights = jnp.broadcast_to((sizes[None, :] / counts.astype(jnp.float32))[:, :, None], masked.shape)
    return masked.reshape(batch_size, padded)[:, :width], weights.reshape(batch_size, padded)[:, :width]


def _guided_block_logits(model, prompt, attn, noisy, answer, cfg_scale, mask_id):
    """float32 logits [rows, A, V] of a block-causal model at the noisy answer `noisy` [rows, A], each block b
    predicted from itself, the prompt [rows, P] and the clean `answer` blocks before b, in one forward over
    noisy ++ prompt ++ answer (`attn` [rows, P + A]: the prompt's and the answer's attention mask); CFG if
    asked (the prompt masked)."""
    rows, plen = prompt.shape
    width = answer.shape[1]
    if cfg_scale > 0:
        un = jnp.where(attn[:, :plen] > 0, mask_id, prompt)
        prompt, attn, noisy, answer = (jnp.concatenate(pair) for pair in ((prompt, un), (attn, attn),
                                                                           (noisy, noisy), (answer, answer)))
    # x_t ++ x_0 of the whole sequence (blocks laid from the prompt's end), less the noisy prompt: no answer
    # query sees it (noisy block b >= 0 sees noisy block b and clean blocks < b only)
    keep = np.arange(plen, 2 * (plen + width))  # the noisy answer, then the clean prompt and answer
    pairs = block_diffusion_pairs(plen + width, model.config.block_size, plen)[:, keep][:, :, keep]
    positions = positions_from_mask(attn, *attn.shape)
    hidden = model.hidden_states(jnp.concatenate([noisy, prompt, answer], axis=1),
                                 jnp.concatenate([attn[:, plen:], attn], axis=1), pairs,
                                 positions=jnp.concatenate([positions[:, plen:], positions], axis=1))
    return _guided(model.logits(hidden[:, :width]), rows, cfg_scale)  # no shift_logits: refused for block_causal


@functools.partial(jax.jit, static_argnames=("graphdef", "batches", "batch_size", "cfg_scale", "mask_id",
                                             "key_impl"))
def _block_likelihood_program(graphdef, state, prompt, prompt_mask, answer, lengths, keys, *, batches: int,
                              batch_size: int, cfg_scale: float, mask_id: int, key_impl: str):
    """`_likelihood_program` for a block-causal model: per Monte Carlo batch and example, the mean over the
    batch's rows of sum_b (n_b / k_b) sum_{masked in block b} CE, float32 [batches, E]."""
    model = nnx.merge(graphdef, state)
    keys = jax.random.wrap_key_data(keys, impl=key_impl)
    examples = prompt.shape[0]
    width = answer.shape[1]
    answer_valid = jnp.arange(width)[None, :] < lengths[:, None]
    attn = jnp.concatenate([prompt_mask, answer_valid.astype(jnp.int32)], axis=1)
    attn = jnp.repeat(attn, batch_size, axis=0)  # [E * b, P + A]
    prompt_rows, answer_rows = jnp.repeat(prompt, batch_size, axis=0), jnp.repeat(answer, batch_size, axis=0)
    block_size = model.config.block_size

    def one_batch(_, j):
        masked, weights = jax.vmap(lambda key, n: block_answer_masks(jax.random.fold_in(key, j), n, batch_size,
                                                                     width, block_size))(keys, lengths)
        noisy = jnp.where(masked, mask_id, answer[:, None, :]).reshape(-1, width)
        logits = _guided_block_logits(model, prompt_rows, attn, noisy, answer_rows, cfg_scale, mask_id)
        ce = token_cross_entropy(logits, answer_rows).reshape(examples, batch_size, width)
        loss = jnp.sum(jnp.where(masked, ce * weights, 0.0), axis=-1)  # [E, b]
        return None, jnp.mean(loss, axis=1)

    _, losses = jax.lax.scan(one_batch, None, jnp.arange(batches))
    return losses


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg_scale", "mask_id", "block_size"))
def _greedy_program(graphdef, state, prompt, prompt_mask, answer, lengths, *, cfg_scale: float, mask_id: int,
                    block_size: int | None):
    """bool [E]: the answer equals the one-token-per-step greedy decode (stops once every row has failed); with
    `block_size` (a block-causal model), a step fills a position of the first block with a mask left."""
    model = nnx.merge(graphdef, state)
    width = answer.shape[1]
    plen = prompt.shape[1]
    valid = jnp.arange(width)[None, :] < lengths[:, None]
    attn = jnp.concatenate([prompt_mask, valid.astype(jnp.int32)], axis=1)
    start = jnp.where(valid, mask_id, 0)

    def cond(carry):
        i, x, ok = carry
        return (i < width) & jnp.any(ok & jnp.any(x == mask_id, axis=1))

    def body(carry):
        i, x, ok = carry
        logits = _guided_answer_logits(model, jnp.concatenate([prompt, x], axis=1), attn, plen, cfg_scale, mask_id)
        x0 = remasking.first_argmax(logits)
        candidates = x == mask_id
        if block_size is not None:  # only the first block with a mask left
            block = jnp.arange(width)[None, :] // block_size
            current = jnp.min(jnp.where(candidates, block, width), axis=1, keepdims=True)
            candidates &= block == current
        confidence = jnp.where(candidates, remasking.low_confidence(logits, x0), -jnp.inf)
        best = remasking.first_argmax(confidence)  # the lowest position on ties
        chosen = (jnp.arange(width)[None, :] == best[:, None]) & (x == mask_id)
        x = jnp.where(chosen, x0, x)
        ok = ok & ~jnp.any(chosen & (x0 != answer), axis=1)
        return i + 1, x, ok

    _, x, ok = jax.lax.while_loop(cond, body, (jnp.int32(0), start, jnp.ones(lengths.shape, bool)))
    return ok
