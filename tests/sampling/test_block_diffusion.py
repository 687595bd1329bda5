"""The block_diffusion sampler on a block_causal model: the exact prefix cache against the uncached sampler, the
uncached sampler against an independent step-by-step reference, the EOS stop, the stats, one compile, the
errors, and `llada-jax sample --sampling_method block_diffusion`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, create_sampler, generate, sharding
from llada_jax.checkpoints.orbax_model import save_model
from llada_jax.cli import main
from llada_jax.sampling import samplers
from tests.sampling_reference import reference_block_diffusion

MASK, EOS, PAD = 511, 510, 510
BLOCK = 4
# Left-padded prompts of 4, 7 and 2 tokens (row 2 puts the prompt's end mid-way through a model block of 4).
PROMPTS = [[3, 17, 42, 99], [8, 1, 300, 65, 12, 77, 5], [250, 6]]
WIDTH = 7


def padded(prompts=PROMPTS):
    ids = np.array([[PAD] * (WIDTH - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (WIDTH - len(p)) + [1] * len(p) for p in prompts], np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(attention_type="block_causal", block_size=BLOCK), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def logits_fn(model):
    """`(anchor) -> (ids, mask) -> numpy logits`: the model on the whole sequence, its blocks laid from `anchor`."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, anchor: nnx.merge(graphdef, state)(ids, block_anchor=anchor))

    def at(anchor):
        def call(ids, mask):
            assert mask is None
            return np.asarray(forward(state, jnp.asarray(ids, jnp.int32), jnp.int32(anchor)))
        return call
    return at


def run(model, ids, mask, **opts):
    out, stats, history = generate(model, ids, mask, method="block_diffusion", return_stats=True,
                                   return_history=True, **opts)
    return np.asarray(out), np.asarray(stats.nfe), int(stats.forward_calls), np.asarray(history)


# --- the exact cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    dict(),
    dict(remasking="random", rng=3),
    dict(temperature=0.8, rng=jax.random.key(5)),
    dict(cfg_scale=1.0),
    dict(threshold=0.02),
    dict(threshold=0.02, cfg_scale=0.5, temperature=0.5, rng=7),
])
def test_the_prefix_cache_gives_the_uncached_tokens_at_every_step(model, extra):
    ids, mask = padded()
    opts = dict(gen_length=16, steps=8, **extra)
    cached, nfe, calls, history = run(model, ids, mask, **opts)
    plain, plain_nfe, plain_calls, plain_history = run(model, ids, mask, cache="none", **opts)
    np.testing.assert_array_equal(history, plain_history)
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(nfe, plain_nfe)
    assert not (cached[:, WIDTH:] == MASK).any()
    # nothing stops early here (checked below): the cache adds its fill and an append after each block but the
    # last (4 blocks), and none of them is a denoising step
    assert not (cached[:, WIDTH:] == EOS).any()
    assert calls == plain_calls + 1 + 3
    if "threshold" not in extra:
        assert plain_calls == 8 and nfe.tolist() == [8 * (2 if extra.get("cfg_scale") else 1)] * 3


def test_prefix_is_the_default_cache_and_block_length_is_the_models(model):
    ids, mask = padded()
    default, _, calls, _ = run(model, ids, mask, gen_length=8, steps=4)
    explicit, _, explicit_calls, _ = run(model, ids, mask, gen_length=8, steps=4, block_length=BLOCK, cache="prefix")
    np.testing.assert_array_equal(default, explicit)
    assert calls == explicit_calls == 4 + 1 + 1  # the steps, the fill, one append: the cache was used
    assert create_sampler("block_diffusion").options.cache == "prefix"
    assert create_sampler("semi_ar_padding").options.cache == "none"


# --- against the step-by-step reference ----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [dict(), dict(cfg_scale=1.0), dict(threshold=0.02)])
@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_each_row_equals_the_reference_on_its_unpadded_prompt(model, logits_fn, cache, extra):
    ids, mask = padded()
    got, nfe, _, _ = run(model, ids, mask, gen_length=12, steps=6, cache=cache, **extra)
    for row, prompt in enumerate(PROMPTS):
        want, steps = reference_block_diffusion(logits_fn(len(prompt)), np.array([prompt]), steps=6, gen_length=12,
                                                block_size=BLOCK, mask_id=MASK, eos_id=EOS, **extra)
        np.testing.assert_array_equal(got[row, WIDTH - len(prompt):], want[0])
        assert nfe[row] == steps * (2 if extra.get("cfg_scale") else 1)
    if "threshold" in extra:
        assert nfe.sum() < 12 * len(PROMPTS)  # some steps commit several tokens


# --- EOS ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_a_row_stops_after_its_first_block_with_eos(model, logits_fn, cache):
    """A token the model generates is made the EOS id: the earlier blocks do not depend on it, so each row's
    tokens are the unstopped ones up to the end of the first block that contains it, then EOS."""
    ids, mask = padded()
    free, _, _, _ = run(model, ids, mask, gen_length=16, steps=8, cache=cache)
    gen = free[:, WIDTH:]
    assert not (gen == EOS).any()
    eos = int(next(t for t in gen[0, BLOCK:2 * BLOCK] if t not in gen[0, :BLOCK]))  # row 0 stops after block 1
    got, nfe, calls, history = run(model, ids, mask, gen_length=16, steps=8, cache=cache, eos_id=eos)
    blocks = []
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(gen[row] == eos)
        stop = 4 if len(hits) == 0 else hits[0] // BLOCK + 1  # blocks the row decodes
        blocks.append(stop)
        want = gen[row].copy()
        if len(hits):
            want[hits[0]:] = eos
        np.testing.assert_array_equal(got[row, WIDTH:], want)
        assert nfe[row] == stop * 2  # two steps a block
        prompt = PROMPTS[row]
        ref, steps = reference_block_diffusion(logits_fn(len(prompt)), np.array([prompt]), steps=8, gen_length=16,
                                               block_size=BLOCK, mask_id=MASK, eos_id=eos)
        np.testing.assert_array_equal(got[row, WIDTH - len(prompt):], ref[0])
        assert steps == nfe[row]
    assert blocks[0] == 2
    loop = max(blocks)  # the loop runs until every row has stopped
    assert calls == loop * 2 + (loop if cache == "prefix" else 0)  # + the fill and loop - 1 appends
    np.testing.assert_array_equal(history[loop * 2:], np.broadcast_to(history[loop * 2 - 1], history[loop * 2:].shape))

    # row 0 alone: the loop ends after its two blocks of four
    _, nfe, calls, _ = run(model, ids[:1], mask[:1], gen_length=16, steps=8, cache=cache, eos_id=eos)
    assert nfe.tolist() == [4] and calls == 4 + (2 if cache == "prefix" else 0)  # + the fill and one append


# --- compilation -------------------------------------------------------------------------------------------


def test_a_second_call_with_the_same_shapes_does_not_recompile(model):
    ids, mask = padded()
    sampler = create_sampler("block_diffusion", gen_length=8, steps=4, threshold=0.3)
    sampler(model, ids, mask)
    before = samplers.program._cache_size()
    sampler(model, ids + 1, mask)
    create_sampler("block_diffusion", gen_length=8, steps=4, threshold=0.3)(model, ids[::-1], mask[::-1])
    assert samplers.program._cache_size() == before


def test_sharded_over_the_mesh_equals_one_device(model):
    mesh = jax.make_mesh((2, 2, 1, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    ids, mask = padded()  # 3 rows: padded to 4 for the 4-way data split
    opts = dict(method="block_diffusion", gen_length=8, steps=4, cfg_scale=0.5, temperature=1.0, rng=2,
                return_stats=True)
    want, want_stats = generate(model, ids, mask, **opts)
    got, stats = generate(model, ids, mask, mesh=mesh, **opts)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(stats.nfe), np.asarray(want_stats.nfe))


# --- errors ------------------------------------------------------------------------------------------------


def test_a_method_the_models_attention_does_not_allow_is_a_clear_error(model):
    ids, _ = padded()
    bidirectional = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_diffusion samples a block-diffusion model .* this model's "
                                         "attention_type is 'bidirectional'"):
        generate(bidirectional, ids, method="block_diffusion", gen_length=8, steps=4)
    for method in ("semi_ar_padding", "fixed_length", "semi_ar_origin"):
        with pytest.raises(ValueError, match=f"method: {method} cannot sample a block_causal model .*block_size 4"
                                             ".* use method 'block_diffusion'"):
            generate(model, ids, method=method, gen_length=8, block_length=4, steps=4)
    with pytest.raises(ValueError, match="gen_length 10 is not a multiple of the model's block_size 4"):
        generate(model, ids, method="block_diffusion", gen_length=10, steps=10)
    with pytest.raises(ValueError, match="steps 6 is not divisible by the number of blocks 4"):
        generate(model, ids, method="block_diffusion", gen_length=16, steps=6)
    with pytest.raises(ValueError, match="cache: block_diffusion's positions after the block are invisible"):
        create_sampler("block_diffusion", cache="dual")
    with pytest.raises(ValueError, match="cache_refresh must be 0 with block_diffusion"):
        create_sampler("block_diffusion", cache_refresh=2)
    with pytest.raises(ValueError, match="gen_length must be a positive integer"):
        create_sampler("block_diffusion", gen_length=0)


# --- the command line --------------------------------------------------------------------------------------


def test_sample_command_writes_the_tokens_of_generate(model, tmp_path, capsys):
    run_dir = save_model(model, str(tmp_path / "run"))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    out = str(tmp_path / "out.jsonl")
    flags = ["--sampling_method", "block_diffusion", "--gen_length", "8", "--steps", "4"]
    assert main(["sample", "--model", run_dir, "--input", str(src), "--output", out, "--batch_size", "2",
                 "--no_progress", *flags]) == 0
    lines = [json.loads(line) for line in open(out, encoding="utf-8")]
    for prompt, line in zip(PROMPTS, lines):
        want, stats = generate(model, np.array([prompt]), method="block_diffusion", gen_length=8, steps=4,
                               return_stats=True)
        assert line["output_ids"] == np.asarray(want)[0, len(prompt):].tolist()
        assert line["nfe"] == int(stats.nfe[0])
    capsys.readouterr()
    assert main(["sample", "--model", run_dir, "--input", str(src), "--output", str(tmp_path / "x.jsonl"),
                 "--no_progress", "--gen_length", "8", "--block_length", "4", "--steps", "4"]) == 2
    assert "semi_ar_padding cannot sample a block_causal model" in capsys.readouterr().err
    assert main(["sample", "--model", run_dir, "--input", str(src), "--output", str(tmp_path / "y.jsonl"),
                 "--no_progress", *flags[:2], "--gen_length", "6", "--steps", "6"]) == 2
    assert "--gen_length 6 is not a multiple of the model's block_size 4" in capsys.readouterr().err
