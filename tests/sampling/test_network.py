"""Fast decoding: the model's KV-cache methods, confidence-threshold parallel decoding, and the cached samplers
(prefix / dual cache, with and without refresh) against the uncached sampler and step-by-step references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, generate
from llada_jax.model import rms_norm
from tests.sampling.test_samplers import PROMPTS, logits_fn
from tests.sampling_reference import reference_generate

MASK = 511


@pytest.fixture(scope="module")
def model():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def one_layer():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(n_layers=1), rngs=nnx.Rngs(2))


def softmax_confidence(logits):
    """(x0, softmax probability of x0) in float64 from numpy logits [B, L, V]."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return logits.argmax(-1), p.max(-1)


# --- the model's cache methods -----------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cache_fill_equals_the_forward_and_a_window_against_it_equals_the_forward_there(scan_layers):
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(scan_layers=scan_layers, n_kv_heads=2), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(3), (2, 14), 0, 500)
    mask = jnp.array([[0, 0, 0] + [1] * 11, [1] * 14], jnp.int32)  # left padding: positions count real tokens

    @jax.jit
    def run(state, ids, mask):
        m = nnx.merge(graphdef, state)
        hidden, kv = m.hidden_states_and_kv(ids, mask)
        window = m.hidden_states_from_kv(ids[:, 5:11], 5, kv, mask)
        changed = ids.at[:, 7].set(7)  # a token of the window changed; the cache is stale elsewhere
        stale = m.hidden_states_from_kv(changed[:, 5:11], 5, kv, mask)
        return m(ids, mask), m.logits(hidden), m.logits(window), m.logits(stale), m(changed, mask), kv

    full, filled, window, stale, changed, kv = run(state, ids, mask)
    assert kv.k.shape == kv.v.shape == (2, 2, 14, 2, 16)
    np.testing.assert_array_equal(np.asarray(filled), np.asarray(full))  # the fill is the forward, bit for bit
    np.testing.assert_allclose(np.asarray(window), np.asarray(full[:, 5:11]), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(stale) - np.asarray(changed[:, 5:11])).max() > 1e-3  # layer 1's keys are stale
    # layer 0 caches the values v_proj(attn_norm(embedding)) of every position
    v_proj = model.blocks.v_proj[...][0] if scan_layers else model.blocks[0].v_proj[...]
    norm = model.blocks.attn_norm[...][0] if scan_layers else model.blocks[0].attn_norm[...]
    h = rms_norm(model.embed(ids), norm, 1e-5)
    np.testing.assert_allclose(np.asarray(kv.v[0]), np.einsum("bld,dnh->blnh", h, v_proj), rtol=1e-5, atol=1e-5)


# --- confidence-threshold parallel decoding ----------------------------------------------------------------


def test_threshold_commits_exactly_the_positions_at_or_above_it_and_at_least_one(model):
    method, gen, block, threshold = "semi_ar_padding", 16, 8, 0.035
    ids, stats, history = generate(model, PROMPTS, method=method, gen_length=gen, block_length=block,
                                   threshold=threshold, return_stats=True, return_history=True)
    history, plen = np.asarray(history), PROMPTS.shape[1]
    assert history.shape == (gen, 2, plen + gen)  # block_length step slots per block
    previous = np.concatenate([PROMPTS, np.full((2, gen), MASK, np.int32)], axis=1)
    steps_taken, sizes, block_steps = np.zeros(2, int), [], np.zeros((gen // block, 2), int)
    for t, x in enumerate(history):
        lo, hi = plen + (t // block) * block, plen + (t // block + 1) * block
        x0, conf = softmax_confidence(logits_fn(model)(previous, None))
        for row in range(2):
            masked = previous[row] == MASK
            masked[:lo] = masked[hi:] = False
            new = (previous[row] == MASK) & (x[row] != MASK)
            if not masked.any():  # the row finished this block: it waits for the other row
                assert not new.any()
                continue
            want = masked & (conf[row] >= threshold)
            want[np.flatnonzero(masked)[np.argmax(conf[row][masked])]] = True  # always the most confident
            np.testing.assert_array_equal(new, want)
            np.testing.assert_array_equal(x[row][new], x0[row][new])
            steps_taken[row] += 1
            block_steps[t // block, row] += 1
            sizes.append(int(new.sum()))
        previous = x
    assert not (np.asarray(ids)[:, plen:] == MASK).any()
    assert 1 in sizes and max(sizes) > 1  # the case discriminates: single and parallel commits
    np.testing.assert_array_equal(np.asarray(stats.nfe), steps_taken)  # per row: the steps it took part in
    assert int(stats.forward_calls) == block_steps.max(1).sum()  # a block runs until its slowest row is done


@pytest.mark.parametrize("method", ["semi_ar_padding", "semi_ar_origin"])
def test_threshold_above_one_is_one_token_per_step(model, method):
    # random remasking: the noise of step i of block n is keyed alike in both; CFG: two evaluations per step
    opts = dict(method=method, gen_length=8, block_length=4, rng=1, return_stats=True, cfg_scale=1.0,
                remasking="random")
    want, want_stats = generate(model, PROMPTS, steps=8, **opts)  # the schedule with one token per step
    got, stats, history = generate(model, PROMPTS, threshold=1.5, return_history=True, **opts)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(stats.nfe), np.asarray(want_stats.nfe))
    masks = (np.asarray(history) == MASK).sum(-1)  # [steps, B]
    np.testing.assert_array_equal(masks, 7 - np.arange(8)[:, None] + np.zeros((1, 2), int))
    assert np.asarray(stats.nfe).tolist() == [16, 16]


# --- the cached samplers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,caches,extra", [
    ("semi_ar_padding", ("prefix", "dual"), dict(cfg_scale=1.5, threshold=0.03)),
    ("semi_ar_origin", ("dual",), dict(temperature=0.8)),
    ("semi_ar_origin", ("prefix",), dict(threshold=0.03)),
    ("fixed_length", ("prefix",), dict(remasking="random", threshold=0.5)),
])
def test_cached_with_refresh_every_step_equals_uncached(model, method, caches, extra):
    opts = dict(method=method, gen_length=8, block_length=4, steps=8, rng=4, return_stats=True, **extra)
    want, want_stats = generate(model, PROMPTS, **opts)
    for cache in caches:
        got, stats = generate(model, PROMPTS, cache=cache, cache_refresh=1, **opts)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(stats.nfe), np.asarray(want_stats.nfe))
        assert int(stats.forward_calls) == int(want_stats.forward_calls)


def test_one_layer_caches_are_exact_without_refresh(one_layer):
    # With one layer the cached keys/values of positions outside the block depend only on their tokens, which
    # do not change during a block: the cache is never stale, so the windowed steps must give the uncached
    # tokens. This checks the windowed (partial) steps themselves.
    attn = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], np.int32)
    opts = dict(gen_length=8, block_length=4, steps=4, rng=2, return_stats=True, cfg_scale=1.0, temperature=0.5,
                threshold=0.03)
    want, want_stats = generate(one_layer, PROMPTS, attn, **opts)
    for cache in ("prefix", "dual"):
        got, stats = generate(one_layer, PROMPTS, attn, cache=cache, **opts)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(stats.nfe), np.asarray(want_stats.nfe))


class CachedLogits:
    """A stateful `logits_fn` for the step-by-step reference: it plays Fast-dLLM's cache with the model's cache
    methods. At a refresh step it runs the whole sequence and keeps every layer's keys/values; at the other
    steps it runs only the window (the block, plus everything after it for the prefix cache) against them.
    Logits outside the window are NaN (the reference must not use them)."""

    def __init__(self, model, *, plen, gen, block, per_block, cache, refresh):
        graphdef, state = nnx.split(model)
        self.fill = jax.jit(lambda s, ids: nnx.merge(graphdef, s).hidden_states_and_kv(ids)[1])
        self.full = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))

        def window(s, ids, kv, start, size):
            m = nnx.merge(graphdef, s)
            return m.logits(m.hidden_states_from_kv(jax.lax.dynamic_slice_in_dim(ids, start, size, 1), start, kv))

        self.window = jax.jit(window, static_argnums=4)
        self.state, self.plen, self.gen, self.block, self.per_block = state, plen, gen, block, per_block
        self.cache, self.refresh, self.step, self.kv = cache, refresh, 0, None

    def __call__(self, ids, attn):
        assert attn is None
        block, i = divmod(self.step, self.per_block)
        self.step += 1
        ids = jnp.asarray(ids, jnp.int32)
        if i == 0 or (self.refresh and i % self.refresh == 0):
            self.kv = self.fill(self.state, ids)
            return np.asarray(self.full(self.state, ids))
        start = self.plen + block * self.block
        out = np.full((ids.shape[0], ids.shape[1], 512), np.nan, np.float32)
        self.fill_window(out, ids, start)
        return out

    def fill_window(self, out, ids, start):
        """Write the logits of a windowed step into `out`: the block (and with the prefix cache every position
        after it), run against the cache."""
        size = self.block if self.cache == "dual" else self.plen + self.gen - start
        out[:, start:start + size] = np.asarray(self.window(self.state, ids, self.kv, start, size))


@pytest.mark.parametrize("cache,refresh", [("prefix", 0), ("dual", 3)])
def test_cached_sampler_follows_the_stepwise_cache_reference(model, cache, refresh):
    gen, block, steps = 8, 4, 8
    got = generate(model, PROMPTS, gen_length=gen, block_length=block, steps=steps, cache=cache,
                   cache_refresh=refresh)
    fn = CachedLogits(model, plen=PROMPTS.shape[1], gen=gen, block=block, per_block=steps * block // gen,
                      cache=cache, refresh=refresh)
    want = reference_generate(fn, PROMPTS, steps=steps, gen_length=gen, block_length=block, mask_id=MASK)
    np.testing.assert_array_equal(np.asarray(got), want)
    plain = generate(model, PROMPTS, gen_length=gen, block_length=block, steps=steps)
    assert not np.array_equal(np.asarray(plain), want)  # stale caches do change this model's tokens


def test_cached_threshold_rows_equal_their_prompt_alone(model):
    prompts = [[3, 17, 42, 99, 7, 250, 8], [8, 1, 300]]
    ids = np.array([[MASK] * (7 - len(p)) + p for p in prompts], np.int32)
    attn = np.array([[0] * (7 - len(p)) + [1] * len(p) for p in prompts], np.int32)
    keys = jax.random.split(jax.random.key(5), 2)
    opts = dict(gen_length=8, block_length=4, temperature=1.0, threshold=0.03, cache="dual", return_stats=True)
    batch, stats = generate(model, ids, attn, rng=keys, **opts)
    alone, alone_stats = generate(model, np.array(prompts[1:], np.int32), rng=keys[1:], **opts)
    np.testing.assert_array_equal(np.asarray(batch)[1, 4:], np.asarray(alone)[0])
    assert int(stats.nfe[1]) == int(alone_stats.nfe[0])


def test_bad_fast_options_name_the_field(model):
    with pytest.raises(ValueError, match="cache: unknown cache 'full'"):
        generate(model, PROMPTS, cache="full")
    with pytest.raises(ValueError, match="threshold must be"):
        generate(model, PROMPTS, threshold=-0.1)
    with pytest.raises(ValueError, match="cache_refresh must be"):
        generate(model, PROMPTS, cache="dual", cache_refresh=-1)
