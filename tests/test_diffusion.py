"""The forward process and the training objectives against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.diffusion import (
    forward_process,
    pretraining_loss,
    random_length_valid,
    sft_loss,
    token_cross_entropy,
)

MASK = 99


def numpy_ce(logits, labels):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


def fixed_case():
    rs = np.random.RandomState(0)
    logits = rs.randn(3, 6, 11).astype(np.float32) * 3
    ids = rs.randint(0, 11, (3, 6))
    masked = rs.rand(3, 6) < 0.5
    masked[0, 0] = True
    p_mask = np.repeat(rs.uniform(0.1, 1.0, (3, 1)), 6, axis=1).astype(np.float32)
    return logits, ids, masked, p_mask


def test_token_cross_entropy_matches_numpy():
    logits, ids, _, _ = fixed_case()
    np.testing.assert_allclose(token_cross_entropy(jnp.asarray(logits), jnp.asarray(ids)), numpy_ce(logits, ids),
                               rtol=1e-5)


def test_pretraining_loss_matches_numpy():
    logits, ids, masked, p_mask = fixed_case()
    ce = numpy_ce(logits, ids)
    expected = sum(ce[b, i] / p_mask[b, i] for b in range(3) for i in range(6) if masked[b, i]) / (3 * 6)
    got = pretraining_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(masked), jnp.asarray(p_mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_pretraining_loss_with_cut_normalises_by_kept_positions():
    logits, ids, masked, p_mask = fixed_case()
    valid = np.zeros((3, 6), bool)
    valid[:, :4] = True
    masked = masked & valid
    ce = numpy_ce(logits, ids)
    # the official code slices the batch to length 4, so the denominator is B * 4
    expected = sum(ce[b, i] / p_mask[b, i] for b in range(3) for i in range(4) if masked[b, i]) / (3 * 4)
    got = pretraining_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(masked), jnp.asarray(p_mask),
                           jnp.asarray(valid))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sft_loss_matches_numpy():
    logits, ids, masked, p_mask = fixed_case()
    prompt = np.array([2, 0, 5])
    masked = masked & (np.arange(6)[None] >= prompt[:, None])
    answer_lengths = 6 - prompt
    ce = numpy_ce(logits, ids)
    rows = [sum(ce[b, i] / p_mask[b, i] for i in range(6) if masked[b, i]) / answer_lengths[b] for b in range(3)]
    got = sft_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(masked), jnp.asarray(p_mask),
                   jnp.asarray(answer_lengths))
    np.testing.assert_allclose(got, np.mean(rows), rtol=1e-5)


def test_forward_process_statistics():
    ids = jnp.arange(64 * 512, dtype=jnp.int32).reshape(64, 512) % 50
    noisy, masked, p_mask = forward_process(jax.random.key(0), ids, mask_id=MASK, eps=1e-3)
    noisy, masked, p_mask = map(np.asarray, (noisy, masked, p_mask))
    # p_mask is constant along a row and within [eps, 1]
    assert np.all(p_mask == p_mask[:, :1]) and p_mask.min() >= 1e-3 and p_mask.max() <= 1.0
    # each row's mask rate is close to its p_mask (binomial, n = 512: std <= 0.023)
    rate = masked.mean(1)
    assert np.max(np.abs(rate - p_mask[:, 0])) < 0.1
    assert abs(np.mean(rate - p_mask[:, 0])) < 0.01
    # the masked tokens, and only those, are the mask token
    np.testing.assert_array_equal(noisy == MASK, masked)
    np.testing.assert_array_equal(noisy[~masked], np.asarray(ids)[~masked])
    # t is uniform: p_mask covers (0, 1)
    assert p_mask[:, 0].min() < 0.2 and p_mask[:, 0].max() > 0.8


def test_forward_process_never_masks_prompts_or_cut_positions():
    ids = jnp.ones((32, 40), jnp.int32)
    prompts = jnp.arange(32) % 40
    valid = jnp.arange(40)[None] < 30
    _, masked, _ = forward_process(jax.random.key(1), ids, mask_id=MASK, prompt_lengths=prompts,
                                   valid=jnp.broadcast_to(valid, (32, 40)))
    masked = np.asarray(masked)
    for b in range(32):
        assert not masked[b, : int(prompts[b])].any()
        assert not masked[b, 30:].any()
    assert masked.sum() > 100  # the rest is masked at the usual rate


def test_forward_process_is_deterministic_for_a_key():
    ids = jnp.zeros((4, 16), jnp.int32)
    a = forward_process(jax.random.key(5), ids, mask_id=MASK)
    b = forward_process(jax.random.key(5), ids, mask_id=MASK)
    c = forward_process(jax.random.key(6), ids, mask_id=MASK)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_random_length_cut_probability_and_range():
    cuts = []
    for seed in range(400):
        valid = np.asarray(random_length_valid(jax.random.key(seed), 2, 64, prob=0.25))
        assert (valid[0] == valid[1]).all()  # one cut for the whole batch
        n = valid[0].sum()
        assert valid[0, :n].all() and not valid[0, n:].any()  # a prefix
        cuts.append(n)
    cuts = np.array(cuts)
    frac_cut = np.mean(cuts < 64)
    assert 0.17 < frac_cut < 0.32, frac_cut  # ~0.25 (a cut to exactly 64 is possible but rare)
    assert cuts.min() >= 1
    never = [np.asarray(random_length_valid(jax.random.key(s), 1, 64, prob=0.0)).all() for s in range(20)]
    assert all(never)


def test_cut_batch_with_fixed_shapes_equals_truncated_batch():
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, 500)
    valid = jnp.broadcast_to(jnp.arange(12)[None] < 7, (2, 12))
    full_shape = model(ids, valid.astype(jnp.int32))
    truncated = model(ids[:, :7])
    np.testing.assert_allclose(full_shape[:, :7], truncated, rtol=1e-5, atol=1e-5)
