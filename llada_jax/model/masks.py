"""Which keys each query sees, and the positions of a row: built from indices (position, block, segment) in one place.

Every attention (the XLA one and the cuDNN kernel) reads these masks; the samplers and the training objectives
build theirs through the same functions. Packed rows (several documents in a row, `segment_ids`) pass `MaskIds`,
per-position ids, down to the attention, which builds the dense [B, L, S] mask only where its kernel needs one
(the XLA path, cuDNN's dense mask): document, causal, block-causal and BD3-LM's x_t ++ x_0 masks alike.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def positions_from_mask(attention_mask: Array | None, batch: int, length: int) -> Array:
    """Absolute positions counting real tokens only: a left-padded row starts at 0 at its first token."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def prediction_sources(attention_mask: Array | None, index: Array, batch: int, positions: Array | None = None
                       ) -> Array:
    """int32 [B, n]: for the positions `index` [n] of a sequence (`attention_mask` [B, L] or None), the index of
    the output that predicts them under `shift_logits`: the one before, except at a row's first real token
    (position 0), which predicts itself. Padding positions (before the first real token) point at themselves.
    `positions` [B, L] replaces the positions counted from `attention_mask` (packed rows: each document's first
    token predicts itself)."""
    if positions is not None:
        positions = jnp.take(positions, index, axis=1)
    elif attention_mask is None:
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



# Packed rows: several documents in one row, each a run of equal segment ids (1, 2, ...; 0 is the padding at the
# end of a row). A mask is built from per-position ids, inside the attention, so a kernel can take the ids instead.

class MaskIds(NamedTuple):
    """What a mask is built from, per position ([B, n] each; `visible_from_ids` builds it). A query sees a key of its
    own segment only; with `block`, a key whose block is <= its own (causal: the block is the position); with
    `noisy` (BD3-LM's x_t ++ x_0), a noisy query sees the noisy keys of its block and the clean keys of earlier
    blocks, and a clean query the clean keys of its block and earlier ones."""

    segment: Array  # int32: the document (equal ids see each other)
    block: Array | None = None  # int32: the block (None: every key of the segment)
    noisy: Array | None = None  # bool: in the noisy half of x_t ++ x_0


def visible_from_ids(query: MaskIds, key: MaskIds | None = None) -> Array:
    """bool [B, L, S]: which keys each query sees (see `MaskIds`); `key` defaults to the queries' own positions."""
    key = query if key is None else key
    visible = query.segment[:, :, None] == key.segment[:, None, :]
    if query.block is None:
        return visible
    qb, kb = query.block[:, :, None], key.block[:, None, :]
    if query.noisy is None:
        return visible & (kb <= qb)
    qn, kn = query.noisy[:, :, None], key.noisy[:, None, :]
    return visible & jnp.where(qn, jnp.where(kn, kb == qb, kb < qb), ~kn & (kb <= qb))


def positions_from_segments(segment_ids: Array) -> Array:
    """int32 [B, L]: each position's index within its segment (positions restart at 0 where the id changes)."""
    b, length = segment_ids.shape
    index = jnp.arange(length, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def document_ids(attention_type: str, segment_ids: Array, block_size: int | None = None, block_anchor=0) -> MaskIds:
    """The `MaskIds` of packed rows for an attention type: bidirectional inside each document, causal, or
    block_causal with blocks laid per document from `block_anchor` (a position within the document: scalar, [B],
    or [B, L], each position its document's anchor: SFT lays an example's blocks from its prompt end)."""
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if attention_type == "bidirectional":
        return MaskIds(segment_ids)
    if attention_type == "causal":
        return MaskIds(segment_ids, jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32),
                                                     segment_ids.shape))
    anchor = jnp.asarray(block_anchor, jnp.int32)
    anchor = anchor[:, None] if anchor.ndim == 1 else anchor
    return MaskIds(segment_ids, jnp.floor_divide(positions_from_segments(segment_ids) - anchor, block_size))


def block_diffusion_ids(segment_ids: Array, blocks: Array) -> MaskIds:
    """The `MaskIds` of BD3-LM's x_t ++ x_0 (2L positions) from the ids [B, L] of x_0: both halves carry the same
    segments and blocks; the first half is the noisy one."""
    noisy = jnp.broadcast_to(jnp.arange(2 * blocks.shape[1]) < blocks.shape[1], (blocks.shape[0], 2 * blocks.shape[1]))
    return MaskIds(jnp.concatenate([segment_ids, segment_ids], axis=1), jnp.concatenate([blocks, blocks], axis=1),
                   noisy)
