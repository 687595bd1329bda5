"""The masked-diffusion forward process and the LLaDA training objectives (pure, jittable functions).

Forward process: for each sequence t ~ U(0, 1) and p_mask = (1 - eps) t + eps; every token is replaced by
the mask token independently with probability p_mask. The mask predictor is trained with the
cross-entropy of the masked tokens weighted by 1 / p_mask, an upper bound of the negative log-likelihood:

    pretraining:  sum_{masked} CE / p_mask  /  (B * L)
    SFT:          mean_b [ sum_{masked in row b} CE / p_mask  /  answer_length_b ]

With probability `random_length_prob` a pretraining batch is cut to a random length in [1, L]. Shapes stay
fixed: `random_length_valid` returns the mask of kept positions, which the model uses as its attention
mask (positions beyond the cut are not attended to) and the loss uses to exclude them and to normalise.

Block diffusion (block_causal models; BD3-LM, Arriola et al., ICLR 2025). The sequence is cut into blocks of
`block_size` laid from an anchor (0 in pretraining; the prompt length in SFT, so the answer starts a block, as
generation does). Every block b of every row gets its own mask rate t_b ~ U[beta, omega] (BD3-LM's clipped
schedule, a variance reduction: the paper's data-driven search selects U[0.3, 0.8] for blocks of 8 and 16 tokens
and U[0.45, 0.95] for 4), and each token of the block is masked with probability t_b. The loss is the same
CE / p_mask sum, normalised as above, of predictions p(x_0^b | x_t^b, x_0^{<b}): BD3-LM's vectorised form runs
them all in one forward over x_t ++ x_0 (2L positions, both halves at positions 0 .. L - 1) under one mask
(`block_diffusion_pairs`): noisy block b sees noisy block b and clean blocks < b; clean block b sees clean
blocks <= b. The logits of the noisy half are the predictions.

Packed rows (data.pack): a row holds several documents (pretraining) or examples (SFT), numbered by `segment_ids`
[B, L] (1, 2, ... in contiguous runs; 0 is the padding at the end of a row, never masked nor scored). Each document
draws its own t (its own block rates in block diffusion) from the row's key (`packed_forward_process`,
`packed_block_forward_process`: a row holding one document is noised exactly as without packing), and the losses
become

    pretraining:  sum_{masked} CE / p_mask  /  (real tokens of the batch)
    SFT:          mean over the batch's examples e of [ sum_{masked in e} CE / p_mask  /  answer_length_e ]

(`pretraining_loss(..., n_positions=)`, `packed_sft_loss`): the documents' own losses combined, weighted by their
tokens in pretraining and equally per example in SFT, the unpacked losses' weights for rows of one document.

Two optional terms of LLaDA 2.0's fine-tuning recipe:

    complementary masking:  each example is trained a second time with the complement of its answer mask (the
                            answer tokens it did not mask, at rate 1 - t), so every answer token is predicted once
                            per pair; each copy is an unbiased estimate with its own rate (weights 1 / t, 1 / (1 - t))
    confidence (CAP):       + beta x mean_{masked i with argmax_v p(v | x_t) = x_0^i} H(p(. | x_t)_i)

the second lowers the entropy where the model is already right, so that more tokens pass a decoding threshold at
once (dFactory's `confidence_beta`: the mean over the step's right predictions; 0 when there are none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def forward_process(
    key: Array,
    input_ids: Array,
    *,
    mask_id: int,
    eps: float = 1e-3,
    prompt_lengths: Array | None = None,
    valid: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Mask tokens independently with a per-row probability.

    Returns `(noisy_ids, masked, p_mask)`, all [B, L]. Positions before `prompt_lengths` (SFT) and positions
    where `valid` is False (random-length cut) are never masked.
    """
    b, length = input_ids.shape
    key_t, key_m = jax.random.split(key)
    t = jax.random.uniform(key_t, (b,), jnp.float32)
    p_mask = jnp.broadcast_to(((1.0 - eps) * t + eps)[:, None], (b, length))
    masked = jax.random.uniform(key_m, (b, length), jnp.float32) < p_mask
    if prompt_lengths is not None:
        masked &= jnp.arange(length)[None, :] >= jnp.asarray(prompt_lengths)[:, None]
    if valid is not None:
        masked &= valid
    noisy = jnp.where(masked, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    return noisy, masked, p_mask


def token_cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-position cross-entropy [B, L] in float32 (logsumexp minus the label's logit)."""
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logits


def pretraining_loss(
    logits: Array, input_ids: Array, masked: Array, p_mask: Array, valid: Array | None = None, n_positions=None
) -> Array:
    """sum over masked tokens of CE / p_mask, divided by the number of (kept) positions, B * L uncut;
    `n_positions` replaces that count (packed rows: the real tokens of a whole step's micro-batches)."""
    weighted = jnp.where(masked, token_cross_entropy(logits, input_ids) / p_mask, 0.0)
    if n_positions is None:
        n_positions = input_ids.size if valid is None else jnp.maximum(jnp.sum(valid), 1)
    return jnp.sum(weighted) / n_positions


def sft_loss(logits: Array, input_ids: Array, masked: Array, p_mask: Array, answer_lengths: Array) -> Array:
    """Mean over rows of (sum over masked answer tokens of CE / p_mask) / answer_length.

    `answer_lengths` [B] counts the answer including its EOS padding (L - prompt_length).
    """
    weighted = jnp.where(masked, token_cross_entropy(logits, input_ids) / p_mask, 0.0)
    per_row = jnp.sum(weighted, axis=-1) / jnp.maximum(jnp.asarray(answer_lengths, jnp.float32), 1.0)
    return jnp.mean(per_row)


def random_length_valid(key: Array, batch: int, length: int, prob: float) -> Array:
    """[B, L] mask of kept positions: with probability `prob` the whole batch is cut to U[1, length]."""
    key_cut, key_len = jax.random.split(key)
    cut_len = jax.random.randint(key_len, (), 1, length + 1)
    cut = jnp.where(jax.random.uniform(key_cut) < prob, cut_len, length)
    return jnp.broadcast_to(jnp.arange(length)[None, :] < cut, (batch, length))


def block_ids(index: Array, block_size, anchor) -> Array:
    """The block of each index when blocks of `block_size` are laid from `anchor` (scalar or [B]): [n] or [B, n];
    indices before the anchor fall in negative blocks."""
    anchor = jnp.asarray(anchor, jnp.int32)
    return jnp.floor_divide(index - anchor[..., None], block_size)


def block_forward_process(
    key: Array,
    input_ids: Array,
    *,
    mask_id: int,
    block_size,
    mask_rate_min: float,
    mask_rate_max: float,
    prompt_lengths: Array | None = None,
    valid: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Mask tokens independently with a per-(row, block) probability t_b ~ U[mask_rate_min, mask_rate_max].

    Returns `(noisy_ids, masked, p_mask)`, all [B, L]. Blocks are laid from `prompt_lengths` (SFT; never
    masked) or from 0; positions where `valid` is False are never masked. `block_size` may be traced (a
    block-size schedule).
    """
    b, length = input_ids.shape
    key_t, key_m = jax.random.split(key)
    anchor = jnp.zeros((b,), jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    n_blocks = length  # an upper bound on the blocks of any block size >= 1 (one rate drawn per slot)
    rates = mask_rate_min + (mask_rate_max - mask_rate_min) * jax.random.uniform(key_t, (b, n_blocks), jnp.float32)
    blocks = jnp.clip(block_ids(jnp.arange(length), block_size, anchor), 0, n_blocks - 1)
    p_mask = jnp.take_along_axis(rates, blocks, axis=1)
    masked = jax.random.uniform(key_m, (b, length), jnp.float32) < p_mask
    if prompt_lengths is not None:
        masked &= jnp.arange(length)[None, :] >= anchor[:, None]
    if valid is not None:
        masked &= valid
    noisy = jnp.where(masked, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    return noisy, masked, p_mask


def block_diffusion_pairs(length: int, block_size, anchor) -> Array:
    """bool [B or 1, 2L, 2L]: which keys each query of x_t ++ x_0 sees (True = visible). Noisy (first half) block
    b sees noisy block b and clean blocks < b; clean (second half) block b sees clean blocks <= b; no clean
    query sees a noisy key. `anchor` (scalar or [B]) as in `block_ids`."""
    index = jnp.arange(2 * length)
    noisy = index < length
    blocks = block_ids(index % length, block_size, anchor)  # [2L] or [B, 2L]
    if blocks.ndim == 1:
        blocks = blocks[None]
    q, k = blocks[:, :, None], blocks[:, None, :]
    q_noisy, k_noisy = noisy[None, :, None], noisy[None, None, :]
    same_noisy = q_noisy & k_noisy & (k == q)
    noisy_sees_clean = q_noisy & ~k_noisy & (k < q)
    clean_sees_clean = ~q_noisy & ~k_noisy & (k <= q)
    return same_noisy | noisy_sees_clean | clean_sees_clean


def complementary_masking(input_ids: Array, masked: Array, p_mask: Array, maskable: Array, *, mask_id: int
                          ) -> tuple[Array, Array, Array]:
    """The second copy of a complementary pair: `(noisy_ids, masked, p_mask)` [B, L] that mask exactly the
    `maskable` positions the first copy (`masked`, drawn with `p_mask`) left clean; each of them was left clean
    with probability 1 - p_mask, the second copy's rate."""
    masked = maskable & ~masked
    noisy = jnp.where(masked, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    return noisy, masked, 1.0 - p_mask


def confidence_loss(logits: Array, input_ids: Array, masked: Array) -> tuple[Array, Array]:
    """(The mean entropy of the predictions at the masked positions predicted right (argmax = the clean token),
    0 when there is none; how many there are): CAP's term, float32."""
    logits = logits.astype(jnp.float32)
    right = masked & (jnp.argmax(logits, axis=-1) == input_ids)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    n_right = jnp.sum(right)
    return jnp.sum(jnp.where(right, entropy, 0.0)) / jnp.maximum(n_right, 1), n_right


def packed_forward_process(key: Array, input_ids: Array, segment_ids: Array, *, mask_id: int, eps: float = 1e-3,
                           maskable: Array | None = None) -> tuple[Array, Array, Array]:
    """`forward_process` for packed rows: t ~ U(0, 1) per document (segment), each token masked with its document's
    p_mask. Returns `(noisy_ids, masked, p_mask)` [B, L]; only `maskable` positions are masked (default: every
    document token; SFT passes the answers, a length cut its kept tokens). Segment s takes the s-th of the row's
    draws, so a row of one document is noised exactly as `forward_process` noises it."""
    b, length = input_ids.shape
    key_t, key_m = jax.random.split(key)
    t = jax.random.uniform(key_t, (b, length), jnp.float32)  # one per segment 1 .. n <= L
    t = jnp.take_along_axis(t, jnp.clip(segment_ids - 1, 0, length - 1), axis=1)
    p_mask = (1.0 - eps) * t + eps
    masked = jax.random.uniform(key_m, (b, length), jnp.float32) < p_mask
    masked &= (segment_ids > 0) if maskable is None else maskable
    noisy = jnp.where(masked, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    return noisy, masked, p_mask


def packed_block_forward_process(key: Array, input_ids: Array, segment_ids: Array, blocks: Array, *, mask_id: int,
                                 mask_rate_min: float, mask_rate_max: float, maskable: Array | None = None
                                 ) -> tuple[Array, Array, Array]:
    """`block_forward_process` for packed rows: a rate t ~ U[mask_rate_min, mask_rate_max] per block of each document
    (`blocks` [B, L]: each position's block within its document, negative before its anchor). The row's draws go to
    its (document, block >= 0) pairs in order, so a row of one document is noised as `block_forward_process` does.
    Returns `(noisy_ids, masked, p_mask)` [B, L]; `maskable` as in `packed_forward_process`."""
    b, length = input_ids.shape
    key_t, key_m = jax.random.split(key)
    rates = mask_rate_min + (mask_rate_max - mask_rate_min) * jax.random.uniform(key_t, (b, length), jnp.float32)
    first = jnp.arange(length)[None, :] == 0
    new = first | (segment_ids != jnp.roll(segment_ids, 1, axis=1)) | (blocks != jnp.roll(blocks, 1, axis=1))
    slot = jnp.clip(jnp.cumsum(new & (blocks >= 0), axis=1) - 1, 0, length - 1)
    p_mask = jnp.take_along_axis(rates, slot, axis=1)
    masked = jax.random.uniform(key_m, (b, length), jnp.float32) < p_mask
    masked &= (segment_ids > 0) if maskable is None else maskable
    noisy = jnp.where(masked, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    return noisy, masked, p_mask


def packed_sft_loss(logits: Array, input_ids: Array, masked: Array, p_mask: Array, segment_ids: Array,
                    answer: Array, n_examples=None) -> Array:
    """The SFT loss of packed rows: the mean over the examples (segments) of the batch of (sum over the example's
    masked answer tokens of CE / p_mask) / its answer length (`answer` [B, L] marks the answer tokens, EOS padding
    included). `n_examples` replaces the batch's count of examples (the examples of a whole step's micro-batches)."""
    weighted = jnp.where(masked, token_cross_entropy(logits, input_ids) / p_mask, 0.0)
    n = segment_ids.shape[1] + 1

    def per_segment(values, segments):  # [L] -> [L + 1]: the sum over each segment id
        return jax.ops.segment_sum(values, segments, num_segments=n)

    sums = jax.vmap(per_segment)(weighted, segment_ids)[:, 1:]
    lengths = jax.vmap(per_segment)(answer.astype(jnp.float32), segment_ids)[:, 1:]
    present = lengths > 0
    if n_examples is None:
        n_examples = jnp.maximum(jnp.sum(present), 1)
    return jnp.sum(jnp.where(present, sums / jnp.maximum(lengths, 1.0), 0.0)) / n_examples
