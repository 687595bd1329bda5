"""Packed rows in the model: a row of several documents (segment_ids) gives every document the logits it gets
alone, in every attention type, and the masks built from ids equal the dense masks they replace."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.diffusion import block_diffusion_pairs
from llada_jax.model import (block_diffusion_ids, document_ids, positions_from_segments, visible_from_ids,
                             visible_pairs)

LENGTH = 24
DOCS = (5, 8, 3, 6)  # three in row 0 (16 tokens, then padding), one in row 1
ANCHORS = (2, 3, 0, 4)  # block_causal: each document's blocks laid from here (an SFT prompt end)


def packed_rows(docs):
    """(ids [2, L], segment_ids [2, L], per-position anchors [2, L], (row, start) of each document)."""
    ids = np.full((2, LENGTH), 510, np.int32)
    segments, anchors = np.zeros((2, LENGTH), np.int32), np.zeros((2, LENGTH), np.int32)
    places, row, start, segment = [], 0, 0, 0
    for k, doc in enumerate(docs):
        if k == 3:
            row, start, segment = 1, 0, 0
        segment += 1
        ids[row, start:start + len(doc)] = doc
        segments[row, start:start + len(doc)] = segment
        anchors[row, start:start + len(doc)] = ANCHORS[k]
        places.append((row, start))
        start += len(doc)
    return ids, segments, anchors, places


@pytest.mark.parametrize("kind", ["bidirectional", "causal", "block_causal", "shift_logits"])
def test_packed_rows_give_every_document_its_logits_alone(kind):
    config = {"bidirectional": {}, "causal": {"attention_type": "causal"},
              "block_causal": {"attention_type": "block_causal", "block_size": 2},
              "shift_logits": {"attention_type": "causal", "shift_logits": True}}[kind]
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(**config), rngs=nnx.Rngs(1))
    rs = np.random.RandomState(0)
    docs = [rs.randint(0, 500, n).astype(np.int32) for n in DOCS]
    ids, segments, anchors, places = packed_rows(docs)
    anchor = jnp.asarray(anchors) if kind == "block_causal" else 0
    packed = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(segments), block_anchor=anchor))
    # each document alone: one row each, right-padded past its end (padded keys are seen by no query)
    alone_ids, alone_mask = np.full((len(docs), max(DOCS)), 510, np.int32), np.zeros((len(docs), max(DOCS)), np.int32)
    for k, doc in enumerate(docs):
        alone_ids[k, :len(doc)], alone_mask[k, :len(doc)] = doc, 1
    alone = np.asarray(model(jnp.asarray(alone_ids), jnp.asarray(alone_mask),
                             block_anchor=jnp.asarray(ANCHORS) if kind == "block_causal" else 0))
    for k, (doc, (row, start)) in enumerate(zip(docs, places)):
        np.testing.assert_allclose(packed[row, start:start + len(doc)], alone[k, :len(doc)], atol=2e-5, rtol=2e-5)


def test_positions_restart_per_segment():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_segments(segments),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def test_masks_from_ids_equal_the_dense_masks():
    one = jnp.ones((2, 12), jnp.int32)  # a row of one document: the ids give the attention type's own mask
    for kind, size in (("causal", None), ("block_causal", 4)):
        dense = visible_pairs(kind, jnp.arange(12), 12, size, jnp.asarray([0, 3]))
        dense = jnp.broadcast_to(dense, (2, 12, 12))
        np.testing.assert_array_equal(visible_from_ids(document_ids(kind, one, size, jnp.asarray([0, 3]))), dense)
    assert bool(visible_from_ids(document_ids("bidirectional", one)).all())
    # BD3-LM's x_t ++ x_0 from ids, per-row anchors
    anchors = jnp.asarray([0, 5])
    blocks = jnp.floor_divide(jnp.arange(12)[None, :] - anchors[:, None], 4)
    np.testing.assert_array_equal(visible_from_ids(block_diffusion_ids(one, blocks)),
                                  block_diffusion_pairs(12, 4, anchors))
    # two documents: nothing crosses between them, in either half
    segments = jnp.asarray([[1] * 5 + [2] * 7])
    seen = np.asarray(visible_from_ids(block_diffusion_ids(segments, jnp.zeros((1, 12), jnp.int32))))[0]
    halves = np.tile(np.asarray(segments[0]), 2)
    assert not seen[halves[:, None] != halves[None, :]].any()


def test_a_packed_moe_row_routes_every_document_as_alone():
    """LLaDA 2.x's MoE network: the same logits, and the router's load counts the documents' tokens only (the
    padding at the row's end routes nowhere), as the documents run alone do."""
    model = LLaDAForMaskedLM(LLaDAConfig.tiny_moe(), rngs=nnx.Rngs(2))
    rs = np.random.RandomState(1)
    docs = [rs.randint(0, 500, n).astype(np.int32) for n in DOCS]
    ids, segments, _, places = packed_rows(docs)
    logits, stats = model.expert_load(jnp.asarray(ids), segment_ids=jnp.asarray(segments))
    alone_ids, alone_mask = np.full((len(docs), max(DOCS)), 510, np.int32), np.zeros((len(docs), max(DOCS)), np.int32)
    for k, doc in enumerate(docs):
        alone_ids[k, :len(doc)], alone_mask[k, :len(doc)] = doc, 1
    alone, alone_stats = model.expert_load(jnp.asarray(alone_ids), jnp.asarray(alone_mask))
    for k, (doc, (row, start)) in enumerate(zip(docs, places)):
        np.testing.assert_allclose(np.asarray(logits)[row, start:start + len(doc)], np.asarray(alone)[k, :len(doc)],
                                   atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(stats.load), np.asarray(alone_stats.load))
    assert float(np.asarray(stats.load).sum()) == sum(DOCS) * model.config.experts_per_token * model.config.n_moe_layers
