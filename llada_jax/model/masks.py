"""Which keys each query sees, and the positions of a row: built from indices (position, block) in one place.

Every attention (the XLA one and the cuDNN kernel) reads these masks; the samplers and the training objectives
build theirs through the same functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def positions_from_mask(attention_mask: Array | None, batch: int, length: int) -> Array:
    """Absolute positions counting real tokens only: a left-padded row starts at 0 at its first token."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def prediction_sources(attention_mask: Array | None, index: Array, batch: int) -> Array:
    """int32 [B, n]: for the positions `index` [n] of a sequence (`attention_mask` [B, L] or None), the index of
    the output that predicts them under `shift_logits`: the one before, except at a row's first real token
    (position 0), which predicts itself. Padding positions (before the first real token) point at themselves."""
    if attention_mask is None:
        positions = jnp.broadcast_to(index, (batch, index.shape[0]))
    else:
        positions = jnp.take(positions_from_mask(attention_mask, *attention_mask.shape), index, axis=1)
    return jnp.where(positions > 0, index - 1, index).astype(jnp.int32)



def visible_pairs(attention_type: str, query_index: Array, key_length: int, block_size: int | None = None,
                  block_anchor=0) -> Array | None:
    """bool [L, S] (or [B, L, S] with a per-row `block_anchor` [B]): which keys each query may see by the attention
    type (None: all). `query_index` [L] holds the queries' indices into the S keys (a window of a sequence starts
    past 0). block_causal: index i is in block floor((i - block_anchor) / block_size), so the blocks are laid from
    the anchor (0 in training; the end of the prompt when sampling, so that generation starts a block and a
    left-padded prompt is cut into the same blocks as the unpadded one) and a query sees the keys of its block
    and of every block before it."""
    keys = jnp.arange(key_length, dtype=jnp.int32)
    if attention_type == "bidirectional":
        return None
    if attention_type == "causal":
        return keys[None, :] <= query_index[:, None]
    anchor = jnp.asarray(block_anchor, jnp.int32)[..., None, None]  # [] or [B] -> broadcastable to [B?, L, S]
    query_block = jnp.floor_divide(query_index[:, None] - anchor, block_size)
    key_block = jnp.floor_divide(keys[None, :] - anchor, block_size)
    return key_block <= query_block

