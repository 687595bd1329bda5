"""LLaDA 2.x's published decoding (`method="llada2"`: blocks from position 0, threshold decoding) and LLaDA 2.1's
token editing (`editing_threshold`, `max_post_steps`) on tiny block_causal models: the jitted sampler (dense
with and without its exact cache, MoE with it) against the step-by-step reference of the published generate()
(`tests/sampling_reference.reference_llada2`) token for token and step for step, on a left-padded batch whose
prompts put their ends at different places in a block; the prompt is never edited; editing happens and its steps
are counted; the flags of `sample` / `inference` / `compile-check --sample` and the lm-eval model args; bad
settings are one line naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, create_sampler, generate
from llada_jax.cli import build_parser, main
from llada_jax.sampling.cli import sampler_options
from tests.sampling_reference import reference_llada2

MASK, EOS, PAD = 511, 510, 510
BLOCK = 4
# Left-padded prompts of 4, 7 and 2 tokens: 0, 3 and 2 of them share the first decoded block with the answer.
PROMPTS = [[3, 17, 42, 99], [8, 1, 300, 65, 12, 77, 5], [250, 6]]
WIDTH = 7
GEN = 10  # not a multiple of the block: llada2 decodes whole blocks and keeps GEN tokens, as published
THRESHOLD = 0.02  # the tiny random models' probabilities are around 1/512: this commits one to a few a step
# editing_threshold 0.02 edits some committed tokens and lets some blocks end before max_post_steps; 0.0 edits
# every committed token whose prediction differs, so each block runs all its post steps
MAX_POST = 3


def padded(prompts=PROMPTS):
    ids = np.array([[PAD] * (WIDTH - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (WIDTH - len(p)) + [1] * len(p) for p in prompts], np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def models():
    return {"dense": LLaDAForMaskedLM(LLaDAConfig.tiny(attention_type="block_causal", block_size=BLOCK),
                                      rngs=nnx.Rngs(0)),
            "moe": LLaDAForMaskedLM(LLaDAConfig.tiny_moe(attention_type="block_causal", block_size=BLOCK),
                                    rngs=nnx.Rngs(1))}


def whole_sequence(model, length=24):
    """The model's logits of whole unpadded sequences, its blocks laid from position 0 (the reference's call). Each
    is run followed by masks up to `length` positions (one compiled shape): later blocks are invisible to it."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids, block_anchor=0))

    def call(ids, mask):
        n = ids.shape[1]
        assert mask is None and n <= length and n % BLOCK == 0
        ids = np.pad(ids, ((0, 0), (0, length - n)), constant_values=MASK)
        return np.asarray(forward(state, jnp.asarray(ids, jnp.int32)))[:, :n]
    return call


def run(model, ids=None, mask=None, **opts):
    if ids is None:
        ids, mask = padded()
    out, stats, history = generate(model, ids, mask, method="llada2", gen_length=GEN, threshold=THRESHOLD,
                                   max_post_steps=MAX_POST, return_stats=True, return_history=True, **opts)
    return np.asarray(out), np.asarray(stats.nfe), int(stats.forward_calls), np.asarray(history)


def edits(history):
    """Per row, how often a committed token (not a mask) changed from one step to the next."""
    return ((history[1:] != history[:-1]) & (history[:-1] != MASK)).sum(axis=(0, 2))


@pytest.mark.parametrize("name, cache, editing", [
    ("dense", "prefix", THRESHOLD),
    ("dense", "none", 0.0),
    ("dense", "prefix", None),  # LLaDA 2.0: threshold decoding alone
    ("moe", "prefix", THRESHOLD),  # (without the cache: the dense cases above)
])
def test_each_row_equals_the_published_generate_on_its_unpadded_prompt(models, name, cache, editing):
    model = models[name]
    ids, _ = padded()
    got, nfe, calls, history = run(model, cache=cache, editing_threshold=editing)
    logits = whole_sequence(model)
    for row, prompt in enumerate(PROMPTS):
        want, steps = reference_llada2(logits, np.array([prompt]), gen_length=GEN, block_size=BLOCK, mask_id=MASK,
                                       eos_id=EOS, threshold=THRESHOLD, editing_threshold=editing,
                                       max_post_steps=MAX_POST)
        np.testing.assert_array_equal(got[row, WIDTH - len(prompt):], want[0])
        assert nfe[row] == steps  # every step the row took part in: the filling and the editing ones
    # the prompt (its tail in the first block included) is the caller's at every step
    np.testing.assert_array_equal(history[:, :, :WIDTH], np.broadcast_to(ids, history[:, :, :WIDTH].shape))
    assert not (got[:, WIDTH:] == MASK).any()
    assert calls >= nfe.max() + (1 if cache == "prefix" else 0)  # + the cache's fill (and appends)
    if editing is None:
        assert not edits(history).any()
    else:
        assert (edits(history) > 0).all()  # every row had committed tokens replaced


def test_editing_spends_steps_after_the_masks_and_never_touches_the_prompt(models):
    """editing_threshold 0 replaces every committed token the model now predicts otherwise: the prompt's tail in the
    first block would be among them, and every block runs max_post_steps steps after its last mask."""
    model = models["dense"]
    ids, mask = padded()
    _, plain_nfe, _, _ = run(model, cache="prefix")  # the programs of the test above
    got, nfe, _, history = run(model, cache="none", editing_threshold=0.0)
    assert (nfe > plain_nfe).all()
    # rows 1 and 2 put 3 and 2 prompt tokens in their first decoded block, and the model predicts other tokens there
    logits = whole_sequence(model)
    for row, prompt in ((1, PROMPTS[1]), (2, PROMPTS[2])):
        start = len(prompt) // BLOCK * BLOCK  # the first decoded block, as the second step reads it
        seq = history[0, row, WIDTH - len(prompt):][None, :start + BLOCK]
        predicted = logits(seq, None)[0].argmax(-1)
        assert (predicted[start:len(prompt)] != seq[0, start:len(prompt)]).any()
    np.testing.assert_array_equal(got[:, :WIDTH], ids)
    np.testing.assert_array_equal(history[:, :, :WIDTH], np.broadcast_to(ids, history[:, :, :WIDTH].shape))


def test_llada2_defaults_are_the_published_ones(models):
    sampler = create_sampler("llada2")
    assert sampler.options.threshold == 0.95 and sampler.options.editing_threshold is None
    assert sampler.options.max_post_steps == 16 and sampler.options.cache == "prefix"
    resolved = sampler.options.resolved(models["moe"].config)
    assert resolved.layout.block_length == BLOCK
    # 128 answer tokens after up to 3 prompt tokens in the first block: 33 blocks of 4; 4 + 16 steps a block
    edit = create_sampler("llada2", editing_threshold=0.9).options.resolved(models["moe"].config).layout
    assert edit.num_blocks == 33 and edit.steps_per_block == 4 + 16


# --- the command lines and the lm-eval adapter ---------------------------------------------------------------


def test_sampling_flags_reach_the_options():
    for command in (["sample", "--model", "m", "--input", "i", "--output", "o"], ["inference", "--model", "m",
                                                                                   "--prompt", "hi"],
                    ["compile-check", "--num_devices", "1", "--sample"]):
        args = build_parser().parse_args([*command, "--sampling_method", "llada2", "--editing_threshold", "0.9",
                                          "--max_post_steps", "4", "--threshold", "0.7"])
        opts = sampler_options(args)
        assert (opts.method, opts.threshold, opts.editing_threshold, opts.max_post_steps) == ("llada2", 0.7, 0.9, 4)
    opts = sampler_options(build_parser().parse_args(["sample", "--model", "m", "--input", "i", "--output", "o"]))
    assert opts.editing_threshold is None and opts.max_post_steps == 16


@pytest.mark.parametrize("flags, message", [
    (["--sampling_method", "llada2", "--editing_threshold", "1.5"],
     "--editing_threshold must be a probability in [0, 1] (or None: no editing), got 1.5"),
    (["--sampling_method", "llada2", "--editing_threshold", "0.9", "--max_post_steps", "-1"],
     "--max_post_steps must be an integer >= 0, got -1"),
    (["--editing_threshold", "0.9"], "editing_threshold: token editing (LLaDA 2.1) runs in the block-diffusion "
                                     "methods ['block_diffusion', 'llada2'] on a block_causal model, not in "
                                     "semi_ar_padding"),
])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys, flags, message):
    """Checked before the model is read (there is none at --model)."""
    assert main(["sample", "--model", str(tmp_path / "none"), "--input", "x", "--output", str(tmp_path / "o"),
                 *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_lm_eval_adapter_takes_the_editing_args(saved):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed")
    from llada_jax.eval.lm_eval_adapter import LLaDAJaxLM
    from llada_jax.tokenizer import config_overrides, load_tokenizer

    _, _, _, base = saved
    helper = load_tokenizer(str(base / "tok"))
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(**config_overrides(helper), attention_type="block_causal",
                                              block_size=BLOCK), rngs=nnx.Rngs(0))
    lm = LLaDAJaxLM(model=model, tokenizer=helper, sampling_method="llada2", gen_length=8, editing_threshold=0.9,
                    max_post_steps=4)
    opts = lm.sampler.options
    assert (opts.method, opts.threshold, opts.editing_threshold, opts.max_post_steps) == ("llada2", 0.95, 0.9, 4)
    with pytest.raises(ValueError, match=r"^max_post_steps must be an integer >= 0, got -2$"):
        LLaDAJaxLM(model=model, tokenizer=helper, sampling_method="llada2", editing_threshold=0.9, max_post_steps=-2)


# --- bad settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(method="llada2", editing_threshold=-0.1), "editing_threshold must be a probability in [0, 1]"),
    (dict(method="llada2", editing_threshold=float("nan")), "editing_threshold must be a probability in [0, 1]"),
    (dict(method="llada2", editing_threshold=True), "editing_threshold must be a probability in [0, 1]"),
    (dict(method="llada2", max_post_steps=-1), "max_post_steps must be an integer >= 0, got -1"),
    (dict(method="llada2", max_post_steps=2.5), "max_post_steps must be an integer >= 0, got 2.5"),
    (dict(method="semi_ar_origin", editing_threshold=0.9), "editing_threshold: token editing (LLaDA 2.1) runs in "
                                                           "the block-diffusion methods"),
    (dict(method="block_diffusion", editing_threshold=0.9), "editing_threshold: token editing runs with threshold "
                                                            "decoding (LLaDA 2.1's joint threshold); pass a "
                                                            "threshold"),
    (dict(method="llada2", editing_threshold=0.9, remasking="random"),
     "editing_threshold: an edit is scored by the probability of the predicted token, so it needs remasking "
     "'low_confidence', not 'random'"),
    (dict(method="llada2", cache="dual"), "cache: llada2's positions after the block are invisible"),
])
def test_bad_settings_are_one_line_naming_the_field(options, message):
    with pytest.raises(ValueError) as e:
        create_sampler(**options)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_model_whose_attention_is_not_block_causal_is_an_error_naming_the_method(models):
    bidirectional = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^method: llada2 samples a block-diffusion model \(attention_type "
                                         r"'block_causal' with a block_size\); this model's attention_type is "
                                         r"'bidirectional'"):
        generate(bidirectional, padded()[0], method="llada2", editing_threshold=0.9, gen_length=8)
    with pytest.raises(ValueError, match="use method 'block_diffusion' .* or 'llada2'"):
        generate(models["dense"], padded()[0], method="semi_ar_padding", gen_length=8, block_length=4, steps=4)
