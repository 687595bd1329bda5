"""Packed rows in the objective (data.pack): the loss of a packed micro-batch is its documents' own losses, each
computed from the document run alone, combined as documented (numpy); BD3-LM's x_t ++ x_0 forward keeps each
document to itself; a row of one document trains as without packing; accumulation equals the full batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAForMaskedLM, sharding
from llada_jax.config import LLaDAConfig, train_config
from llada_jax.diffusion import packed_block_forward_process, packed_forward_process
from llada_jax.model import document_ids
from llada_jax.train.step import STEP_COUNT, Trainer, packed_rows, with_step_count

LENGTH = 16
EOS, MASK = 510, 511
BLOCK = 4
# (prompt length, answer length with its EOS padding) of each example, row by row; pretraining uses their sums
ROWS = (((3, 5), (2, 4)), ((1, 2), (4, 8)), ((2, 6), (5, 1), (1, 1)), ((6, 2), (1, 5), (1, 1)))
MODELS = {"bidirectional": LLaDAConfig.tiny(), "block_causal": LLaDAConfig.tiny(attention_type="block_causal",
                                                                              block_size=BLOCK)}


def make_trainer(task, kind, batch_size=2, accumulation=1):
    c = train_config(MODELS[kind], task=task)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = batch_size, accumulation, LENGTH
    c.learning_rate, c.warmup_steps, c.max_steps, c.random_length_prob = 3e-3, 0, 100, 0.0
    return Trainer(c, MODELS[kind], sharding.make_mesh(c.mesh, jax.devices()[:1]))


@functools.lru_cache(maxsize=None)
def initial_params(kind):
    """The tiny model's parameters (one initialisation per model kind, shared by the tests)."""
    return nnx.to_pure_dict(nnx.state(LLaDAForMaskedLM(MODELS[kind], rngs=nnx.Rngs(0)), nnx.Param))


def packed_batch(rows=ROWS[:2], task="sft", seed=0):
    """(micro-batch of packed rows, the documents: (row, start, ids, prompt length) each)."""
    rs = np.random.RandomState(seed)
    ids = np.full((len(rows), LENGTH), EOS, np.int32)
    segments, prompt = np.zeros_like(ids), np.zeros_like(ids)
    docs = []
    for r, examples in enumerate(rows):
        start = 0
        for s, (p, a) in enumerate(examples, 1):
            doc = rs.randint(0, 500, p + a).astype(np.int32)
            ids[r, start:start + p + a], segments[r, start:start + p + a] = doc, s
            prompt[r, start:start + p] = 1
            docs.append((r, start, doc, p if task == "sft" else 0))
            start += p + a
    micro = {"input_ids": ids, "segment_ids": segments}
    if task == "sft":
        micro["prompt_mask"] = prompt
    return micro, docs


def alone_rows(docs, rows):
    """Every document in a row of its own, right-padded: (ids, mask, prompt lengths)."""
    width = max(len(d[2]) for d in docs)
    ids, mask = np.full((len(docs), width), EOS, np.int32), np.zeros((len(docs), width), bool)
    for k, (r, start, doc, _) in enumerate(docs):
        ids[k, :len(doc)], mask[k, :len(doc)] = rows[r, start:start + len(doc)], True
    return ids, mask, np.asarray([d[3] for d in docs], np.int32)


def cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


@pytest.mark.parametrize("task,kind", [("pretrain", "bidirectional"), ("sft", "bidirectional"),
                                       ("pretrain", "block_causal"), ("sft", "block_causal")])
def test_packed_loss_is_the_documents_losses_alone_combined(task, kind):
    trainer = make_trainer(task, kind)
    micro, docs = packed_batch(task=task)
    micro = jax.tree.map(jnp.asarray, micro)
    params = initial_params(kind)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(5), r))(jnp.arange(2))
    block_size = jnp.int32(BLOCK) if kind == "block_causal" else None
    loss, (n_masked, _, _) = jax.jit(functools.partial(trainer._loss, with_terms=False))(
        params, trainer.frozen, micro, row_keys, None, None, block_size)

    # the noise the step drew: each document its own t (block rates), from the row's key
    rows = packed_rows(micro, None, task)
    noised = []
    for r in range(2):
        args = (row_keys[r], micro["input_ids"][r:r + 1], rows.segment_ids[r:r + 1])
        if kind == "block_causal":
            blocks = document_ids("block_causal", rows.segment_ids, BLOCK, rows.anchors).block[r:r + 1]
            out = packed_block_forward_process(*args, blocks, mask_id=MASK, mask_rate_min=0.3, mask_rate_max=0.8,
                                               maskable=rows.maskable[r:r + 1])
        else:
            out = packed_forward_process(*args, mask_id=MASK, eps=1e-3, maskable=rows.maskable[r:r + 1])
        noised.append([np.asarray(x[0]) for x in out])
    noisy, masked, p_mask = (np.stack(x) for x in zip(*noised))
    assert int(n_masked) == masked.sum() > 0

    # each document run alone (its own row, right-padded), with that noise
    ids, mask, prompts = alone_rows(docs, np.asarray(micro["input_ids"]))
    noisy_alone, _, _ = alone_rows(docs, noisy)
    model = nnx.merge(trainer.graphdef, params, trainer.frozen)
    if kind == "block_causal":
        logits, _ = Trainer._block_diffusion_logits(model, jnp.asarray(noisy_alone), jnp.asarray(ids),
                                                    jnp.asarray(prompts) if task == "sft" else None,
                                                    jnp.asarray(mask), block_size)
    else:
        logits = model(jnp.asarray(noisy_alone), jnp.asarray(mask, jnp.int32))
    logits = np.asarray(logits)
    sums, tokens, answers = [], [], []
    for k, (r, start, doc, p) in enumerate(docs):
        span = slice(start, start + len(doc))
        ce = cross_entropy(logits[k, :len(doc)], ids[k, :len(doc)])
        sums.append(np.sum(np.where(masked[r, span], ce / p_mask[r, span], 0.0)))
        tokens.append(len(doc))
        answers.append(len(doc) - p)
        assert not masked[r, start:start + p].any()  # a prompt is never masked
    assert not masked[np.asarray(rows.segment_ids) == 0].any()  # nor the padding
    if task == "sft":  # the mean over the examples of each one's SFT loss
        expected = np.mean(np.asarray(sums) / np.asarray(answers))
    else:  # the documents' summed CE / p_mask over the batch's real tokens
        expected = np.sum(sums) / np.sum(tokens)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


@pytest.mark.parametrize("kind", ["bidirectional", "block_causal"])
def test_a_row_of_one_example_trains_as_without_packing(kind):
    """One example per row (segment 1 everywhere, its answer padded to max_length): the packed step draws the same
    noise and gives the same loss as the unpacked one."""
    trainer = make_trainer("sft", kind)
    micro, _ = packed_batch(rows=(((3, 13),),), task="sft")
    micro = {key: np.concatenate([value, value[:, ::-1] if key == "input_ids" else value])
             for key, value in micro.items()}
    unpacked = {"input_ids": micro["input_ids"], "prompt_lengths": np.asarray([3, 3], np.int32),
                "answer_lengths": np.asarray([13, 13], np.int32)}
    params = initial_params(kind)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(2), r))(jnp.arange(2))
    block_size = jnp.int32(BLOCK) if kind == "block_causal" else None
    loss = jax.jit(functools.partial(trainer._loss, with_terms=False))
    a, (masked_a, _, _) = loss(params, trainer.frozen, jax.tree.map(jnp.asarray, micro), row_keys, None, None,
                               block_size)
    b, (masked_b, _, _) = loss(params, trainer.frozen, jax.tree.map(jnp.asarray, unpacked), row_keys, None, None,
                               block_size)
    assert int(masked_a) == int(masked_b)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_packed_accumulation_equals_the_full_batch():
    """Packed micro-batches hold different numbers of examples: the step's loss and update with 2 micro-batches of
    2 rows equal one batch of the 4 rows (the losses divide by the step's count, `with_step_count`)."""
    micro, _ = packed_batch(rows=ROWS, task="sft")
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        trainer = make_trainer("sft", "bidirectional", batch_size, accumulation)
        batch = {k: v.reshape((accumulation, batch_size) + v.shape[1:]) for k, v in micro.items()}
        state, metrics = trainer.step(trainer.init_state(0), jax.device_put(batch, trainer.batch_sharding))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), state.params))
    (loss, norm, params), (other_loss, other_norm, other_params) = results
    np.testing.assert_allclose([other_loss, other_norm], [loss, norm], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(other_params)):  # Adam: near-zero gradients' rounding
        np.testing.assert_allclose(a, b, atol=1e-3)  # can move a parameter by a fraction of the step (lr 3e-3)
    # the counts: examples (SFT) or real tokens kept by a length cut (pretraining), over the micro-batches
    batch = jax.tree.map(jnp.asarray, {k: v.reshape((2, 2) + v.shape[1:]) for k, v in micro.items()})
    assert float(with_step_count(batch, None, "sft")[STEP_COUNT][0]) == 10 / 2
    cut = jnp.arange(LENGTH)[None, :] < 12
    tokens = float(jnp.sum((batch["segment_ids"] > 0) & cut))
    np.testing.assert_array_equal(with_step_count(batch, cut, "pretrain")[STEP_COUNT], [tokens / 2] * 2)
