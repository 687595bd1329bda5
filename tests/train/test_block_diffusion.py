"""The block-diffusion objective (block_causal models): the BD3-LM vectorised form (one forward over x_t ++ x_0)
against an explicit per-block reference, the noise, the block-size schedule, and the settings' errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.config import train_config
from llada_jax.diffusion import (
    block_diffusion_pairs,
    block_forward_process,
    pretraining_loss,
    sft_loss,
    token_cross_entropy,
)
from llada_jax.errors import ConfigError
from llada_jax.train.loop import validate

MASK = 511
BLOCK = 4


@pytest.fixture(scope="module")
def model():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(attention_type="block_causal", block_size=BLOCK), rngs=nnx.Rngs(3))


def _vectorised_logits(model, noisy, ids, anchor):
    """The noisy half's logits of one forward over x_t ++ x_0 (what the train step computes)."""
    b, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    pairs = block_diffusion_pairs(length, BLOCK, anchor)
    hidden = model.hidden_states(jnp.concatenate([noisy, ids], axis=1), None, pairs,
                                 positions=jnp.concatenate([positions, positions], axis=1))
    return np.asarray(model.logits(hidden[:, :length]))


def _per_block_logits(model, noisy, ids, anchors):
    """The reference: for every block, one forward over the clean sequence before it followed by the noisy block
    (the block-causal model with blocks laid from the row's anchor), its logits at the block."""
    b, length = ids.shape
    out = np.zeros((b, length, model.config.padded_vocab_size), np.float32)
    for row in range(b):
        anchor = int(anchors[row])
        starts = list(range(anchor, length, BLOCK))
        for start in starts:
            seq = np.concatenate([np.asarray(ids[row, :start]), np.asarray(noisy[row, start:start + BLOCK])])
            logits = np.asarray(model(jnp.asarray(seq)[None], block_anchor=anchor))[0]
            out[row, start:start + BLOCK] = logits[start:start + BLOCK]
    return out


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_vectorised_loss_equals_the_per_block_reference(model, task):
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(0, 500, (3, 16)))
    prompt_lengths = jnp.asarray([4, 6, 9]) if task == "sft" else None
    noisy, masked, p_mask = block_forward_process(jax.random.key(1), ids, mask_id=MASK, block_size=BLOCK,
                                                  mask_rate_min=0.3, mask_rate_max=0.8,
                                                  prompt_lengths=prompt_lengths)
    anchors = np.zeros(3, int) if prompt_lengths is None else np.asarray(prompt_lengths)
    vec = _vectorised_logits(model, noisy, ids, 0 if prompt_lengths is None else prompt_lengths)
    ref = _per_block_logits(model, noisy, ids, anchors)
    predicted = np.arange(16)[None, :] >= anchors[:, None]  # every position the objective can score
    np.testing.assert_allclose(vec[predicted], ref[predicted], atol=2e-5, rtol=2e-5)
    if task == "sft":
        lengths = 16 - prompt_lengths
        got, want = sft_loss(vec, ids, masked, p_mask, lengths), sft_loss(ref, ids, masked, p_mask, lengths)
    else:
        got, want = pretraining_loss(vec, ids, masked, p_mask), pretraining_loss(ref, ids, masked, p_mask)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # and the loss is the formula's: sum of CE / p_mask over masked tokens, / (B * L) for pretraining
    if task == "pretrain":
        manual = np.sum(np.where(masked, np.asarray(token_cross_entropy(jnp.asarray(ref), ids)) / p_mask, 0)) / ids.size
        np.testing.assert_allclose(float(got), manual, rtol=1e-5)


def test_block_noise_one_rate_per_block_within_the_clipped_range():
    ids = jnp.zeros((64, 32), jnp.int32)
    prompt = jnp.full((64,), 6)
    _, masked, p_mask = block_forward_process(jax.random.key(0), ids, mask_id=MASK, block_size=8,
                                              mask_rate_min=0.3, mask_rate_max=0.8, prompt_lengths=prompt)
    p, m = np.asarray(p_mask), np.asarray(masked)
    assert not m[:, :6].any()  # the prompt is never masked
    answer = p[:, 6:30].reshape(64, 3, 8)  # blocks laid from the prompt: [6, 14), [14, 22), [22, 30)
    assert (answer == answer[..., :1]).all()  # one rate per block
    assert answer.min() >= 0.3 and answer.max() <= 0.8
    assert np.std(answer[:, :, 0]) > 0.1  # rates differ between blocks and rows
    rate = m[:, 6:30].mean()
    assert abs(rate - answer.mean()) < 0.03  # tokens masked at the block's rate


def test_pairs_mask_is_bd3lms():
    pairs = np.asarray(block_diffusion_pairs(4, 2, 0))[0]
    noisy_noisy, noisy_clean, clean_noisy, clean_clean = pairs[:4, :4], pairs[:4, 4:], pairs[4:, :4], pairs[4:, 4:]
    same_block = np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool))
    earlier = np.kron(np.tril(np.ones((2, 2), bool), -1), np.ones((2, 2), bool))
    np.testing.assert_array_equal(noisy_noisy, same_block)
    np.testing.assert_array_equal(noisy_clean, earlier)
    assert not clean_noisy.any()
    np.testing.assert_array_equal(clean_clean, same_block | earlier)


def _trainer(**changes):
    from llada_jax import sharding
    from llada_jax.train.step import Trainer

    c = train_config(LLaDAConfig.tiny(attention_type="block_causal", block_size=BLOCK))
    c.batch_size, c.gradient_accumulation_steps, c.max_length, c.warmup_steps = 4, 1, 16, 0
    c.learning_rate, c.random_length_prob = 3e-3, 0.0
    for key, value in changes.items():
        target = c
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    from llada_jax.config import model_config_from

    return Trainer(c, model_config_from(c), sharding.make_mesh(c.mesh, jax.devices()[:1]))


def test_train_step_learns_and_the_schedule_sets_the_block_size():
    trainer = _trainer()
    state = trainer.init_state(0)
    rs = np.random.RandomState(0)
    batch = {"input_ids": jnp.asarray(np.tile(rs.randint(0, 50, (1, 1, 16)), (1, 4, 1)))}
    losses = []
    for _ in range(30):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    c = trainer.step_config
    assert c.block_diffusion and int(c.block_size_at(0)) == BLOCK
    scheduled = _trainer(**{"block_diffusion.block_size_schedule": ((0, 1), (10, 8), (20, 4))}).step_config
    assert [int(scheduled.block_size_at(s)) for s in (0, 9, 10, 19, 20, 99)] == [1, 1, 8, 8, 4, 4]


@pytest.mark.parametrize("key,value,message", [
    ("block_diffusion.mask_rate_min", 0.0, "0 < mask_rate_min <= mask_rate_max <= 1"),
    ("block_diffusion.block_size_schedule", ((10, 4), (0, 2)), "increasing order"),
    ("block_diffusion.block_size_schedule", ((0, 3),), "block size 3 does not divide max_length 16"),
    ("model.block_size", 5, "model.block_size: block size 5 does not divide max_length 16"),
    ("adaptation.mask_annealing_steps", 10, "bidirectional models, not block_causal"),
])
def test_bad_block_diffusion_settings_are_named(tmp_path, key, value, message):
    c = train_config(LLaDAConfig.tiny(attention_type="block_causal", block_size=BLOCK))
    c.max_length, c.output_dir = 16, str(tmp_path / "run")
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n')
    c.data_path = str(data)
    target = c
    *path, last = key.split(".")
    for p in path:
        target = target[p]
    target[last] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_bad_model_type_combinations_are_errors():
    with pytest.raises(ValueError, match="block_size"):
        LLaDAConfig.tiny(attention_type="block_causal")
    with pytest.raises(ValueError, match="block_size"):
        LLaDAConfig.tiny(block_size=4)
    with pytest.raises(ValueError, match="shift_logits"):
        LLaDAConfig.tiny(attention_type="block_causal", block_size=4, shift_logits=True)


def test_adapt_a_bidirectional_run_into_a_block_causal_model_with_a_schedule(tmp_path, pretrain_data):
    """A bidirectional LLaDA run, then pretraining from it as a block-causal model with a block-size schedule:
    the run is block_causal (recorded in its config and export), learns, and its export reloads identically."""
    import json
    import os

    from llada_jax.train.metrics import read_metrics
    from tests.runs import TINY, cli

    common = ["--config", TINY, "--data_path", pretrain_data, "--batch_size", "8", "--max_length", "32",
              "--config.gradient_accumulation_steps=1", "--config.checkpoint.async_save=false", "--logging_steps", "1"]
    base, adapted = str(tmp_path / "base"), str(tmp_path / "adapted")
    cli("pretrain", *common, "--output_dir", base, "--max_steps", "4", devices=1)
    cli("pretrain", *common, "--output_dir", adapted, "--max_steps", "24", "--model_name_or_path", base,
        "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--config.model.attention_type=block_causal", "--config.model.block_size=8",
        "--config.block_diffusion.block_size_schedule=((0, 1), (8, 4), (16, 8))", devices=1)
    model = json.load(open(os.path.join(adapted, "config.json")))["model"]
    assert (model["attention_type"], model["block_size"]) == ("block_causal", 8)
    losses = [m["loss"] for m in read_metrics(adapted) if "loss" in m]
    assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:4])
    hf = str(tmp_path / "hf")
    cli("convert", "to-hf", "--input", adapted, "--output", hf, devices=1)
    config = json.load(open(os.path.join(hf, "config.json")))
    assert (config["attention_type"], config["block_size"]) == ("block_causal", 8)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 500, (2, 16)))
    a = LLaDAForMaskedLM.from_pretrained(adapted)
    b = LLaDAForMaskedLM.from_pretrained(hf)
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
