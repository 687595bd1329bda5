"""The masked-diffusion forward process and the LLaDA training objectives (pure, jittable functions).

Forward process: for each sequence t ~ U(0, 1) and p_mask = (1 - eps) t + eps; every token is replaced by
the mask token independently with probability p_mask. The mask predictor is trained with the
cross-entropy of the masked tokens weighted by 1 / p_mask, an upper bound of the negative log-likelihood:

    pretraining:  sum_{masked} CE / p_mask  /  (B * L)
    SFT:          mean_b [ sum_{masked in row b} CE / p_mask  /  answer_length_b ]

With probability `random_length_prob` a pretraining batch is cut to a random length in [1, L]. Shapes stay
fixed: `random_length_valid` returns the mask of kept positions, which the model uses as its attention
mask (positions beyond the cut are not attended to) and the loss uses to exclude them and to normalise.
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
    logits: Array, input_ids: Array, masked: Array, p_mask: Array, valid: Array | None = None
) -> Array:
    """sum over masked tokens of CE / p_mask, divided by the number of (kept) positions, B * L uncut."""
    weighted = jnp.where(masked, token_cross_entropy(logits, input_ids) / p_mask, 0.0)
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
