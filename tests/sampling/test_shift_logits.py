"""The samplers on a `shift_logits` model (Dream, DiffuLLaMA: the prediction for position i read from the output
at i - 1): the uncached sampler against the step-by-step reference fed the model's (shifted) logits, the cached
samplers against the uncached one, and the cache window against a stepwise cache reference."""

import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, generate
from tests.sampling.test_network import CachedLogits
from tests.sampling.test_samplers import PROMPTS, logits_fn
from tests.sampling_reference import reference_generate, reference_origin

MASK, EOS, PAD = 511, 510, 510


@pytest.fixture(scope="module")
def shifted():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(shift_logits=True), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def one_layer():
    """One layer, shifted, in both attention types (an adapted AR model may still be causal)."""
    return {t: LLaDAForMaskedLM(LLaDAConfig.tiny(n_layers=1, shift_logits=True, attention_type=t), rngs=nnx.Rngs(2))
            for t in ("bidirectional", "causal")}


@pytest.mark.parametrize("method,gen,block,steps,cfg", [
    ("semi_ar_padding", 16, 4, 8, 0.0),
    ("semi_ar_padding", 16, 8, 6, 1.5),
    ("fixed_length", 16, 16, 5, 0.0),
])
def test_uncached_matches_the_step_by_step_reference_on_shifted_logits(shifted, method, gen, block, steps, cfg):
    got = np.asarray(generate(shifted, PROMPTS, method=method, gen_length=gen, block_length=block, steps=steps,
                              cfg_scale=cfg))
    # the reference sees model(ids): logits already aligned with the positions they predict
    want = reference_generate(logits_fn(shifted), PROMPTS, steps=steps, gen_length=gen, block_length=block,
                              cfg_scale=cfg, mask_id=MASK)
    np.testing.assert_array_equal(got, want)
    # the shift matters: the same parameters without it decode other tokens
    unshifted = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))
    assert not np.array_equal(got, np.asarray(generate(unshifted, PROMPTS, method=method, gen_length=gen,
                                                       block_length=block, steps=steps, cfg_scale=cfg)))


def test_uncached_matches_the_reference_with_padding_and_a_prompt_mask(shifted):
    # a mask inside a left-padded prompt: filled at the steps where every position's logits are read
    prompts = np.array([[PAD, PAD, 3, 17, MASK, 99], [8, 1, 300, 65, 12, 77]], np.int32)
    attn = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)
    got = generate(shifted, prompts, attn, gen_length=16, block_length=8, steps=8)
    want = reference_generate(logits_fn(shifted), prompts, attn, steps=8, gen_length=16, block_length=8,
                              mask_id=MASK, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_semi_ar_origin_matches_the_growing_reference(shifted):
    ids = generate(shifted, PROMPTS[:1], method="semi_ar_origin", gen_length=12, block_length=4, steps=6,
                   cfg_scale=0.5)
    want, _ = reference_origin(logits_fn(shifted), PROMPTS[:1], steps=6, gen_length=12, block_length=4, mask_id=MASK,
                               eos_id=EOS, cfg_scale=0.5)
    np.testing.assert_array_equal(np.asarray(ids), want)


@pytest.mark.parametrize("method,extra", [
    ("semi_ar_padding", {}),
    ("semi_ar_padding", dict(cfg_scale=1.5, threshold=0.03)),
    ("semi_ar_origin", dict(temperature=0.8)),
    ("semi_ar_origin", dict(threshold=0.03, cfg_scale=1.0)),
    ("fixed_length", dict(remasking="random", threshold=0.5)),
])
def test_cached_with_refresh_every_step_equals_uncached(shifted, method, extra):
    opts = dict(method=method, gen_length=8, block_length=4, steps=8, rng=4, return_stats=True, **extra)
    want, want_stats = generate(shifted, PROMPTS, **opts)
    for cache in ("prefix", "dual"):
        got, stats = generate(shifted, PROMPTS, cache=cache, cache_refresh=1, **opts)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(stats.nfe), np.asarray(want_stats.nfe))


@pytest.mark.parametrize("attention_type", ["bidirectional", "causal"])
@pytest.mark.parametrize("method", ["semi_ar_padding", "semi_ar_origin"])
def test_one_layer_caches_are_exact_without_refresh(one_layer, attention_type, method):
    # One layer: the cached keys / values outside the window depend only on tokens that do not change during a
    # block, so the windowed steps must give the uncached tokens. With shifted logits the window has to
    # include the position before the block (the first position of a block is predicted from it).
    model = one_layer[attention_type]
    attn = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], np.int32)
    for extra in (dict(steps=6), dict(threshold=0.03, cfg_scale=1.0, temperature=0.5)):
        opts = dict(method=method, gen_length=12, block_length=4, rng=2, return_stats=True, **extra)
        want, want_stats = generate(model, PROMPTS, attn, **opts)
        for cache in ("prefix", "dual"):
            got, stats = generate(model, PROMPTS, attn, cache=cache, **opts)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{cache} {extra}")
            np.testing.assert_array_equal(np.asarray(stats.nfe), np.asarray(want_stats.nfe))


class ShiftedCachedLogits(CachedLogits):
    """`CachedLogits` (Fast-dLLM's cache played step by step) on a shifted model: a windowed step runs from the
    position before the block (to the block's end with the dual cache, to the sequence's end with the prefix
    cache) against the cache, its unshifted logits moved one position right. Logits outside the block are NaN."""

    def fill_window(self, out, ids, start):
        end = start + self.block if self.cache == "dual" else self.plen + self.gen
        unshifted = np.asarray(self.window(self.state, ids, self.kv, start - 1, end - start + 1))
        out[:, start:start + self.block] = unshifted[:, :self.block]  # position i from the output at i - 1


@pytest.mark.parametrize("cache,refresh", [("prefix", 0), ("dual", 0), ("dual", 3)])
def test_cached_sampler_follows_the_stepwise_cache_reference(shifted, cache, refresh):
    gen, block, steps = 8, 4, 8
    got = generate(shifted, PROMPTS, gen_length=gen, block_length=block, steps=steps, cache=cache,
                   cache_refresh=refresh)
    fn = ShiftedCachedLogits(shifted, plen=PROMPTS.shape[1], gen=gen, block=block, per_block=steps * block // gen,
                             cache=cache, refresh=refresh)
    want = reference_generate(fn, PROMPTS, steps=steps, gen_length=gen, block_length=block, mask_id=MASK)
    np.testing.assert_array_equal(np.asarray(got), want)
    plain = generate(shifted, PROMPTS, gen_length=gen, block_length=block, steps=steps)
    assert not np.array_equal(np.asarray(plain), want)  # stale caches do change this model's tokens


def test_a_left_padded_row_whose_first_token_is_masked_equals_it_alone(shifted):
    """The first real token of a row predicts itself (as position 0 of the unpadded row), also when it is a mask
    the sampler fills. (An empty prompt would test the same, but its all-mask row has exact confidence ties.)"""
    ids, attn = np.array([[3, 17, 42, 9], [PAD, PAD, MASK, 42]], np.int32), np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    for steps in (4, 8):
        batch = np.asarray(generate(shifted, ids, attn, gen_length=8, block_length=8, steps=steps))
        alone = np.asarray(generate(shifted, np.array([[MASK, 42]]), gen_length=8, block_length=8, steps=steps))
        np.testing.assert_array_equal(batch[1, 2:], alone[0])
