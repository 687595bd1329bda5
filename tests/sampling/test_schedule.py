"""The unmasking schedule and the block layout."""

import jax.numpy as jnp
import numpy as np

from llada_jax.sampling.options import BlockLayout
from llada_jax.sampling.schedule import num_transfer_tokens


def test_schedule_matches_the_formula():
    masked = np.arange(0, 70)
    for steps in (1, 3, 4, 7, 32, 100):
        k = np.asarray(num_transfer_tokens(jnp.asarray(masked), steps))
        for m, row in zip(masked, k):
            base, rem = divmod(int(m), steps)
            assert row.tolist() == [base + 1] * rem + [base] * (steps - rem)
            assert row.sum() == m
    layout = BlockLayout.checked(64, 16, 8)
    assert (layout.num_blocks, layout.steps_per_block, layout.max_transfer) == (4, 2, 8)
    assert BlockLayout.checked(12, 12, 5).max_transfer == 3
    assert BlockLayout.checked(4, 4, 8).max_transfer == 1  # more steps than tokens: some steps commit 0
