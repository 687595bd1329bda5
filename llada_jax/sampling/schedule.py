"""The unmasking schedule: how many masked tokens each denoising step commits.

LLaDA's linear noise schedule means every step of a block should reveal the same expected number of tokens.
With `masked` tokens in a block (counted per row when the block starts) and `steps` steps for the block:

    base = masked // steps,   remainder = masked % steps
    k[step] = base + 1   for step < remainder
    k[step] = base       otherwise

so the counts sum to `masked`. Blocks of `block_length` are decoded left to right and the total step budget
is split evenly among them (`steps // num_blocks` each; see `options.BlockLayout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_transfer_tokens(masked: jax.Array, steps: int) -> jax.Array:
    """k for every step: int32 [B, steps] from the per-row masked counts [B]."""
    masked = jnp.asarray(masked, jnp.int32)
    return transfer_count(masked[:, None], steps, jnp.arange(steps, dtype=jnp.int32)[None, :])


def transfer_count(masked: jax.Array, steps: int, step: jax.Array) -> jax.Array:
    """k for one step index `step` (broadcasts): base + (step < remainder)."""
    base, remainder = masked // steps, masked % steps
    return base + (step < remainder).astype(masked.dtype)
