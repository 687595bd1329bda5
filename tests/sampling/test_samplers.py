"""The samplers: step invariants, CFG, padding invariance, origin EOS stop, randomness, the official
algorithm (an independent PyTorch reference), compile-once, sharding, and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, create_sampler, generate, sharding
from llada_jax.model import positions_from_mask
from llada_jax.sampling import samplers
from llada_jax.sampling.schedule import num_transfer_tokens
from tests.sampling_reference import reference_generate, reference_origin

MASK, EOS, PAD = 511, 510, 510


@pytest.fixture(scope="module")
def model():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))


_FORWARDS = {}


def logits_fn(model):
    """A jitted forward `(ids, mask) -> numpy logits`, one per model (so shapes compile once per test run)."""
    if id(model) in _FORWARDS:
        return _FORWARDS[id(model)][1]
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    def call(ids, mask):
        mask = None if mask is None else jnp.asarray(mask, jnp.int32)
        return np.asarray(forward(state, jnp.asarray(ids, jnp.int32), mask))

    _FORWARDS[id(model)] = (model, call)  # keeps the model alive, so its id is not reused
    return call


class EosAfter(nnx.Module):
    """Test model: the tiny model with EOS made the certain prediction at real positions >= `start`. The sampler
    asks a model for `hidden_states` and then the `logits` of the positions it needs; here the position rides
    along as an extra channel of the hidden states."""

    def __init__(self, inner, start):
        self.inner, self.config, self.start = inner, inner.config, start

    def hidden_states(self, ids, attention_mask=None):
        pos = positions_from_mask(attention_mask, *ids.shape).astype(jnp.float32)
        return jnp.concatenate([self.inner.hidden_states(ids, attention_mask), pos[..., None]], axis=-1)

    def logits(self, hidden):
        logits = self.inner.logits(hidden[..., :-1])
        return logits.at[..., EOS].add(jnp.where(hidden[..., -1] >= self.start, 1e3, 0.0))

    def __call__(self, ids, attention_mask=None):
        return self.logits(self.hidden_states(ids, attention_mask))


PROMPTS = np.array([[3, 17, 42, 99, 7, 250], [8, 1, 300, 65, 12, 77]], np.int32)


# --- step invariants, from the recorded trajectory ----------------------------------------------------------


@pytest.mark.parametrize("method,block_length,steps,extra", [
    ("semi_ar_padding", 4, 8, {}),
    ("fixed_length", 16, 6, {}),
    ("semi_ar_padding", 8, 6, dict(temperature=0.8, remasking="random")),
    ("semi_ar_origin", 4, 12, {}),
])
def test_each_step_commits_exactly_k_in_the_block_and_never_changes_a_token(model, method, block_length, steps,
                                                                            extra):
    gen = 16
    ids, stats, history = generate(model, PROMPTS, method=method, gen_length=gen, block_length=block_length,
                                   steps=steps, rng=5, return_stats=True, return_history=True, **extra)
    history = np.asarray(history)
    plen, per_block = PROMPTS.shape[1], steps // (gen // block_length)
    assert history.shape == (steps, 2, plen + gen)
    previous = np.concatenate([PROMPTS, np.full((2, gen), MASK, np.int32)], axis=1)
    counts = None  # the block's masks when it starts
    for t, x in enumerate(history):
        block = t // per_block
        lo, hi = plen + block * block_length, plen + (block + 1) * block_length
        was_set = previous != MASK
        np.testing.assert_array_equal(x[was_set], previous[was_set])  # committed tokens never change
        new = (previous == MASK) & (x != MASK)
        counts = previous[:, lo:hi] == MASK if t % per_block == 0 else counts
        k = np.asarray(num_transfer_tokens(jnp.asarray(counts.sum(1)), per_block))[:, t % per_block]
        np.testing.assert_array_equal(new.sum(1), k)  # exactly k per row
        assert not new[:, :lo].any() and not new[:, hi:].any()  # nothing outside the current block
        previous = x
    assert not (np.asarray(ids)[:, plen:] == MASK).any()
    assert np.asarray(stats.nfe).tolist() == [steps, steps]


# --- the official algorithm -------------------------------------------------------------------------------


@pytest.mark.parametrize("method,gen,block,steps,cfg", [
    ("semi_ar_padding", 16, 4, 8, 0.0),
    ("semi_ar_padding", 16, 8, 6, 1.5),  # uneven k: 8 masks over 3 steps = [3, 3, 2]
    ("fixed_length", 16, 16, 5, 0.0),  # 16 masks over 5 steps = [4, 3, 3, 3, 3]
])
def test_matches_the_step_by_step_reference_at_temperature_0(model, method, gen, block, steps, cfg):
    got = generate(model, PROMPTS, method=method, gen_length=gen, block_length=block, steps=steps, cfg_scale=cfg)
    want = reference_generate(logits_fn(model), PROMPTS, steps=steps, gen_length=gen, block_length=block,
                              cfg_scale=cfg, mask_id=MASK)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_matches_the_reference_with_padding_prompt_masks_and_eos_options(model):
    # Left padding with an attention mask, a mask token inside a prompt (filled like any masked position),
    # and the Appendix B.4 options at temperature 0.
    prompts = np.array([[PAD, PAD, 3, 17, MASK, 99], [8, 1, 300, 65, 12, 77]], np.int32)
    attn = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)
    for extra in ({}, dict(confidence_eos_eot_inf=True, eot_id=200)):
        got = generate(model, prompts, attn, gen_length=16, block_length=8, steps=8, **extra)
        want = reference_generate(logits_fn(model), prompts, attn, steps=8, gen_length=16, block_length=8,
                                  mask_id=MASK, eos_id=EOS, **extra)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_eos_options_change_what_is_chosen(model):
    rigged = EosAfter(model, start=10)  # EOS is the argmax from real position 10 on
    forbidden = np.asarray(generate(rigged, PROMPTS, gen_length=12, block_length=12, steps=12, logits_eos_inf=True))
    assert not (forbidden == EOS).any()
    # EOS keeps its prediction but gets the lowest confidence: the EOS positions are committed last.
    _, hist = generate(rigged, PROMPTS, gen_length=12, block_length=12, steps=12, confidence_eos_eot_inf=True,
                       return_history=True)
    hist = np.asarray(hist)
    assert (hist[-1][:, 10:] == EOS).all()
    # 4 other positions (6..9) go first, one per step; then the 8 EOS ones (confidence 0, ties lowest first)
    assert (hist[3][:, 10:] == MASK).all() and not (hist[3][:, 6:10] == MASK).any()
    assert (hist[4][:, 11:] == MASK).all() and (hist[4][:, 10] == EOS).all()


def test_cfg_arithmetic(model):
    # fixed_length with one token per step: the first step commits the single most confident position of
    # the guided logits un + (s + 1)(cond - un), where `un` is the input with the prompt masked.
    scale = 2.0
    _, hist = generate(model, PROMPTS, method="fixed_length", gen_length=8, steps=8, cfg_scale=scale,
                       return_history=True)
    x = np.concatenate([PROMPTS, np.full((2, 8), MASK, np.int32)], axis=1)
    un_x = x.copy()
    un_x[:, :6] = MASK
    cond, un = (logits_fn(model)(a, None).astype(np.float64) for a in (x, un_x))

    def first_choice(logits):  # (position, token) of the most confident masked position, per row
        p = np.exp(logits - logits.max(-1, keepdims=True))
        conf = (p / p.sum(-1, keepdims=True)).max(-1)[:, 6:]
        j = conf.argmax(-1)
        return [(6 + int(j[r]), int(logits[r, 6 + j[r]].argmax())) for r in range(2)]

    guided = first_choice(un + (scale + 1) * (cond - un))
    first = np.asarray(hist[0])
    for row in range(2):
        (pos, token), = [(int(i), int(first[row, i])) for i in np.flatnonzero(first[row] != x[row])]
        assert (pos, token) == guided[row]
    assert guided != first_choice(cond) and guided != first_choice(un)  # the test tells the three apart


# --- padding invariance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,extra", [
    ("semi_ar_origin", {}),
    ("semi_ar_padding", dict(temperature=1.0, cfg_scale=1.0, remasking="random")),  # both noises, by position
])
def test_each_row_equals_its_prompt_alone(model, method, extra):
    prompts = [[3, 17, 42, 99, 7, 250, 8], [8, 1, 300]]
    width = max(map(len, prompts))
    ids = np.array([[MASK] * (width - len(p)) + p for p in prompts], np.int32)  # even padded with the mask id
    attn = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
    keys = jax.random.split(jax.random.key(7), 2)
    opts = dict(method=method, gen_length=8, block_length=4, steps=8, **extra)
    batch = np.asarray(generate(model, ids, attn, rng=keys, **opts))
    # the short prompt alone (the long one is unpadded in the batch already)
    alone = np.asarray(generate(model, np.array(prompts[1:], np.int32), rng=keys[1:], **opts))
    np.testing.assert_array_equal(batch[1, width - len(prompts[1]):], alone[0])


# --- semi_ar_origin ----------------------------------------------------------------------------------------


def test_semi_ar_origin_stops_at_the_first_block_with_eos(model):
    rigged = EosAfter(model, start=13)  # real positions 13+ predict EOS
    prompts = np.array([[PAD, PAD, PAD, 3, 17, 42, 99], [8, 1, 300, 65, 12, 77, 5]], np.int32)
    attn = (np.arange(7)[None] >= np.array([[3], [0]])).astype(np.int32)
    ids, stats = generate(rigged, prompts, attn, method="semi_ar_origin", gen_length=16, block_length=4, steps=8,
                          return_stats=True)
    ids = np.asarray(ids)
    # row 0: 4 real prompt tokens, EOS from generated offset 9 (block 2); row 1: 7 tokens, offset 6 (block 1)
    assert np.asarray(stats.nfe).tolist() == [3 * 2, 2 * 2] and int(stats.forward_calls) == 3 * 2
    for row, first_eos in ((0, 9), (1, 6)):
        gen = ids[row, 7:]
        assert (gen[first_eos:] == EOS).all() and not (gen[:first_eos] == EOS).any()
    # against the reference that really grows the sequence
    fn = logits_fn(rigged)
    for row, p in enumerate(([3, 17, 42, 99], [8, 1, 300, 65, 12, 77, 5])):
        want, blocks = reference_origin(fn, np.array([p]), steps=8, gen_length=16, block_length=4, mask_id=MASK,
                                        eos_id=EOS)
        np.testing.assert_array_equal(ids[row, 7 - len(p):], want[0])
        assert blocks * 2 == int(stats.nfe[row])


def test_semi_ar_origin_without_eos_decodes_every_block_like_the_reference(model):
    ids, stats = generate(model, PROMPTS[:1], method="semi_ar_origin", gen_length=12, block_length=4, steps=6,
                          cfg_scale=0.5, return_stats=True)
    want, blocks = reference_origin(logits_fn(model), PROMPTS[:1], steps=6, gen_length=12, block_length=4,
                                    mask_id=MASK, eos_id=EOS, cfg_scale=0.5)
    np.testing.assert_array_equal(np.asarray(ids), want)
    if not (want == EOS).any():
        assert blocks == 3 and int(stats.nfe[0]) == 6 * 2  # CFG: two evaluations per step


# --- randomness --------------------------------------------------------------------------------------------


def test_temperature_is_deterministic_per_key_and_differs_across_keys(model):
    opts = dict(gen_length=16, block_length=8, steps=8, temperature=1.0)
    a = np.asarray(generate(model, PROMPTS, rng=jax.random.key(1), **opts))
    b = np.asarray(generate(model, PROMPTS, rng=jax.random.key(1), **opts))
    c = np.asarray(generate(model, PROMPTS, rng=jax.random.key(2), **opts))
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 8
    r1 = np.asarray(generate(model, PROMPTS, rng=3, remasking="random", **{**opts, "temperature": 0.0}))
    r2 = np.asarray(generate(model, PROMPTS, rng=4, remasking="random", **{**opts, "temperature": 0.0}))
    assert not np.array_equal(r1, r2)


# --- compilation and sharding ------------------------------------------------------------------------------


def test_second_call_with_the_same_shapes_does_not_recompile(model):
    sampler = create_sampler("semi_ar_padding", gen_length=8, block_length=4, steps=4)
    sampler(model, PROMPTS)
    before = samplers.program._cache_size()
    sampler(model, PROMPTS + 1)
    create_sampler("semi_ar_padding", gen_length=8, block_length=4, steps=4)(model, PROMPTS[::-1])
    generate(model, PROMPTS, gen_length=8, block_length=4, steps=4)
    assert samplers.program._cache_size() == before
    sampler(model, PROMPTS[:1])  # a new shape compiles once more
    assert samplers.program._cache_size() == before + 1


@pytest.mark.parametrize("method,extra", [
    ("semi_ar_padding", {}),
    ("semi_ar_padding", dict(threshold=0.5, cache="dual")),
    ("semi_ar_origin", dict(temperature=1.0, remasking="random")),
])
def test_prompt_lengths_of_one_bucket_share_a_program_and_give_the_unbucketed_answer(model, method, extra):
    """A call left-pads the prompt to its bucket (`options.prompt_bucket`): prompts of 3 to 24 tokens with
    gen_length 8 lie in one bucket (64 positions), so they compile once, and each answer equals the call at the
    prompt's own length (`prompt_buckets=False`), in the caller's columns."""
    opts = dict(method=method, gen_length=8, block_length=4, steps=8, rng=5, **extra)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 500, (1, n)).astype(np.int32) for n in (3, 11, 24)]
    before = samplers.program._cache_size()
    for prompt in prompts:
        got = np.asarray(generate(model, prompt, **opts))
        want = np.asarray(generate(model, prompt, prompt_buckets=False, **opts))
        assert got.shape == (1, prompt.shape[1] + 8)
        np.testing.assert_array_equal(got, want)
    # one program for the three bucketed calls, one per length without buckets
    assert samplers.program._cache_size() == before + 1 + len(prompts)


def test_prompt_buckets_round_the_sequence_up():
    from llada_jax.sampling.options import prompt_bucket

    # prompt + gen_length: multiples of 64 positions up to 256, then of a quarter of the next power of two
    assert [prompt_bucket(n, 128, 4096) for n in (1, 32, 64, 65, 128, 129, 300, 385, 500)] == \
        [64, 64, 64, 128, 128, 256, 384, 640, 640]
    assert prompt_bucket(890, 128, 1024) == 896 and prompt_bucket(897, 128, 1024) == 897  # capped by the model
    with pytest.raises(ValueError, match="prompt_buckets must be True or False"):
        create_sampler("fixed_length", prompt_buckets=1)


def test_sharded_over_the_mesh_equals_one_device(model):
    mesh = jax.make_mesh((2, 2, 1, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    prompts = np.concatenate([PROMPTS, PROMPTS[:1] + 3])  # 3 rows: padded to 4 for the 4-way data split
    opts = dict(method="semi_ar_origin", gen_length=8, block_length=4, steps=4, temperature=1.0, rng=2,
                return_stats=True)
    want, want_stats = generate(model, prompts, **opts)
    got, stats = generate(model, prompts, mesh=mesh, **opts)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(stats.nfe), np.asarray(want_stats.nfe))
    # the rows really are split 4 ways over data x fsdp: one row per shard (a replicated result would also
    # span all 8 devices). With 4 rows nothing is padded, so the result keeps the sampler's layout; the 3
    # rows above are sliced back out of the padded 4 and come back replicated.
    four = np.concatenate([prompts, PROMPTS[1:] + 5])
    got4 = generate(model, four, mesh=mesh, **{**opts, "return_stats": False})
    assert got4.sharding.spec == jax.P(("data", "fsdp"))
    assert [s.data.shape for s in got4.addressable_shards] == [(1, got4.shape[1])] * 8


# --- errors ------------------------------------------------------------------------------------------------


def test_bad_input_names_the_field(model):
    with pytest.raises(ValueError, match="method: unknown sampling method 'diagonal'"):
        generate(model, PROMPTS, method="diagonal")
    with pytest.raises(ValueError, match="remasking: unknown remasking strategy"):
        create_sampler("fixed_length", remasking="lowest")
    with pytest.raises(ValueError, match="gen_length 10 is not divisible by block_length 4"):
        generate(model, PROMPTS, gen_length=10, block_length=4, steps=10)
    with pytest.raises(ValueError, match="steps 6 is not divisible by the number of blocks 4"):
        generate(model, PROMPTS, gen_length=16, block_length=4, steps=6)
    with pytest.raises(ValueError, match="exceeds the model's max_sequence_length 512"):
        generate(model, np.zeros((1, 500), np.int32), gen_length=16, block_length=16, steps=16)
    with pytest.raises(ValueError, match="temperature must be"):
        generate(model, PROMPTS, temperature=-1.0)
    with pytest.raises(ValueError, match="mask_id 600 is outside"):
        generate(model, PROMPTS, mask_id=600)
    with pytest.raises(ValueError, match="attention_mask: shape"):
        generate(model, PROMPTS, np.ones((2, 3)))
    with pytest.raises(TypeError, match="unknown option"):
        create_sampler("fixed_length", gen_len=4)
    with pytest.raises(ValueError, match="rng: expected one key or 2 keys"):
        generate(model, PROMPTS, temperature=1.0, rng=jax.random.split(jax.random.key(0), 3))
