"""One denoising decision: predict x0, score each prediction, commit the k most confident masked positions.

These are the pieces of the official step, written as pure functions of arrays:

- `predict`: x0 = argmax(logits) at temperature 0, else argmax(logits + T * Gumbel) (a sample from
  softmax(logits / T), see `noise`). argmax ties go to the lowest token id, like torch.argmax.
- `low_confidence`: the softmax probability of x0 under the unperturbed float32 logits,
  exp(l[x0] - max l) / sum exp(l - max l). Token ids in `exclude_ids` are removed from that softmax first, so
  an x0 that is one of them scores exactly 0: the lowest confidence any masked candidate can have, chosen only
  when a step must commit more tokens than there are other candidates (this is what the official
  `confidence_eos_eot_inf` option amounts to at temperature 0).
- `select_top_k`: per row, the k[row] positions of highest confidence (k varies by row, no Python).
- `select_threshold`: per row, every position whose confidence reaches a threshold, at least the top one.

Ties in `select_top_k`: equal confidences are taken lowest position first (`lax.top_k`'s documented order;
torch.topk leaves the order among equal values unspecified, and on CPU it is not the lowest index). With
continuous float32 confidences exact ties are rare; they occur when probabilities saturate at exactly 1.0 or
for the -inf of non-candidates, which are never needed (each step's k is at most the number of masked
candidates before the block end).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llada_jax.sampling import noise


def predict(logits: jax.Array, temperature: float, keys: jax.Array | None = None,
            positions: jax.Array | None = None) -> jax.Array:
    """x0 int32 [B, L] from float32 logits [B, L, V]; with temperature > 0, `keys` [B] (this step's Gumbel
    keys) and `positions` [B, L] (see `noise`) pick the noise."""
    if temperature > 0:
        logits = logits + jnp.float32(temperature) * noise.gumbel(keys, positions, logits.shape[-1])
    return first_argmax(logits)


def first_argmax(values: jax.Array) -> jax.Array:
    """argmax over the last axis, the first index on ties (jnp.argmax's result, but as max + min-index
    reductions: XLA:CPU runs jnp.argmax's variadic reduction about 6x slower)."""
    top = jnp.max(values, axis=-1, keepdims=True)
    index = jnp.arange(values.shape[-1], dtype=jnp.int32)
    first = jnp.min(jnp.where(values == top, index, values.shape[-1]), axis=-1)
    return jnp.minimum(first, values.shape[-1] - 1)  # a NaN row has no max: clamp into range


def low_confidence(logits: jax.Array, x0: jax.Array, exclude_ids: tuple[int, ...] = ()) -> jax.Array:
    """softmax(logits)[x0] in float32 [B, L]; ids in `exclude_ids` get probability 0 (removed from the softmax)."""
    logits = logits.astype(jnp.float32)
    for token in exclude_ids:
        logits = logits.at[..., token].set(-jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    total = jnp.sum(jnp.exp(logits - top), axis=-1)
    chosen = jnp.take_along_axis(logits, x0[..., None], axis=-1)[..., 0]
    return jnp.exp(chosen - top[..., 0]) / total


def select_top_k(confidence: jax.Array, k: jax.Array, max_k: int) -> jax.Array:
    """bool [B, L]: True at the k[b] highest-confidence positions of row b (k[b] <= max_k, a static bound)."""
    b, length = confidence.shape
    max_k = min(max_k, length)
    _, index = jax.lax.top_k(confidence, max_k)  # equal values: lower index first
    take = jnp.arange(max_k)[None, :] < k[:, None]
    return jnp.zeros((b, length), bool).at[jnp.arange(b)[:, None], index].set(take)


def select_threshold(confidence: jax.Array, threshold: float) -> jax.Array:
    """bool [B, L]: per row, every position whose confidence is at least `threshold`, and always the most
    confident one (the lowest position on ties), so each row with a finite confidence commits at least one
    (confidence-threshold parallel decoding, Fast-dLLM). Positions with confidence -inf are never chosen."""
    best = first_argmax(confidence)
    top = jnp.arange(confidence.shape[-1])[None, :] == best[:, None]
    return (confidence > -jnp.inf) & ((confidence >= threshold) | top)
