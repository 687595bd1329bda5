"""The unmasking schedule: how many masked tokens each denoising step commits, and the block layout.

LLaDA's linear noise schedule means every step of a block should reveal the same expected number of tokens.
With `masked` tokens in a block (counted per row when the block starts) and `steps` steps for the block:

    base = masked // steps,   remainder = masked % steps
    k[step] = base + 1   for step < remainder
    k[step] = base       otherwise

so the counts sum to `masked`. Blocks of `block_length` are decoded left to right and the total step budget
is split evenly among them (`steps // num_blocks` each).
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How `gen_length` generated positions and `steps` denoising steps split into blocks."""

    gen_length: int
    block_length: int
    steps: int

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def max_transfer(self) -> int:
        """The largest k any step can ask for (a block holds at most block_length masks)."""
        return max(1, -(-self.block_length // self.steps_per_block))

    @classmethod
    def checked(cls, gen_length: int, block_length: int, steps: int) -> "BlockLayout":
        """Validate the three sizes (as the official sampler asserts), naming the offending field."""
        for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if gen_length % block_length:
            raise ValueError(f"gen_length {gen_length} is not divisible by block_length {block_length}")
        num_blocks = gen_length // block_length
        if steps % num_blocks:
            raise ValueError(f"steps {steps} is not divisible by the number of blocks {num_blocks} "
                             f"(gen_length {gen_length} / block_length {block_length})")
        return cls(gen_length, block_length, steps)
