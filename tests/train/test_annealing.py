"""Attention-mask annealing (DiffuLLaMA): the per-step mask, its effect on the train step, resume exactness."""

import itertools
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import sharding
from llada_jax.config import LLaDAConfig, train_config
from llada_jax.diffusion import forward_process, pretraining_loss
from llada_jax.train.step import ANNEALING_STREAM, Trainer, annealing_mask, step_keys
from tests.runs import cli
from tests.train.test_loop import checkpoint_steps, common, losses

LENGTH = 32
MODEL = LLaDAConfig.tiny()


def make_trainer(annealing=0, batch_size=8, accumulation=1, task="pretrain", model=MODEL, seed=0):
    c = train_config(model, task=task)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = batch_size, accumulation, LENGTH
    c.learning_rate, c.warmup_steps, c.max_steps, c.random_length_prob, c.seed = 3e-3, 2, 100, 0.0, seed
    c.adaptation.mask_annealing_steps = annealing
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return Trainer(c, model, sharding.make_mesh(c.mesh, jax.devices()[:1]))


def batch(task="pretrain", rows=8, seed=0):
    rs = np.random.RandomState(seed)
    b = {"input_ids": rs.randint(0, 500, (rows, LENGTH)).astype(np.int32)}
    if task == "sft":
        prompt = rs.randint(1, LENGTH // 2, rows).astype(np.int32)
        b["prompt_lengths"], b["answer_lengths"] = prompt, (LENGTH - prompt).astype(np.int32)
    return b


def step_at(trainer, step, data, accumulation=1):
    """The metrics of train step `step` (0-based) from the initial parameters (seed 0) on `data`."""
    state = trainer.init_state(0)
    state = state.replace(step=jax.device_put(jnp.int32(step), trainer.state_shardings.step))
    shaped = {k: v.reshape((accumulation, -1) + v.shape[1:]) for k, v in data.items()}
    _, metrics = trainer.step(state, jax.device_put(shaped, trainer.batch_sharding))
    return {k: np.asarray(v) for k, v in metrics.items()}


def reference_mask(seed, step, length, n):
    """The documented scheme rebuilt in numpy: tril | (uniform(fold_in(step key, stream)) < min(1, (s + 1) / N))."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), ANNEALING_STREAM)
    ratio = min(np.float32(1), np.float32(step + 1) / np.float32(n))
    return np.tril(np.ones((length, length), bool)) | (np.asarray(jax.random.uniform(key, (length, length))) < ratio)


def test_mask_is_a_function_of_seed_and_step():
    n, length = 10, 64
    masks = {(seed, s): np.asarray(annealing_mask(seed, s, length, n)) for seed in (0, 1) for s in range(n + 2)}
    for (seed, s), m in masks.items():
        np.testing.assert_array_equal(m, reference_mask(seed, s, length, n))
        np.testing.assert_array_equal(m, np.asarray(annealing_mask(seed, jnp.int32(s), length, n)))  # traced step
    assert not np.array_equal(masks[0, 3], masks[1, 3]) and not np.array_equal(masks[0, 3], masks[0, 4])
    # the trainer's mask: the same whatever the batch size, micro-batching or task
    for trainer in (make_trainer(n), make_trainer(n, batch_size=2, accumulation=4), make_trainer(n, task="sft")):
        for s in (0, 5):
            np.testing.assert_array_equal(np.asarray(trainer.visible_mask(s)), reference_mask(0, s, LENGTH, n))
    assert make_trainer(0).visible_mask(3) is None


def test_mask_goes_from_causal_to_all_visible():
    n, length = 8, 64
    upper = np.triu(np.ones((length, length), bool), k=1)
    fractions = []
    for s in range(n + 3):
        m = np.asarray(annealing_mask(0, s, length, n))
        assert m[~upper].all()  # query i always sees keys j <= i
        r = min(1.0, (s + 1) / n)
        fraction = m[upper].mean()
        # 2016 strictly-upper entries: the binomial standard deviation is at most 0.012
        assert abs(fraction - r) < 0.05, (s, fraction, r)
        fractions.append(fraction)
        if s >= n - 1:
            assert m.all()
    assert all(a < b for a, b in itertools.pairwise(fractions[:n])), fractions
    # with a very long annealing the first step's mask is causal
    np.testing.assert_array_equal(np.asarray(annealing_mask(0, 0, length, 2**30)), ~upper)


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_annealed_step_equals_the_step_without_annealing(task):
    data = batch(task)
    plain = make_trainer(0, task=task)
    annealed = make_trainer(3, task=task)
    for s in (2, 3, 7):  # from step N - 1 on, every future key is visible
        a, b = step_at(annealed, s, data), step_at(plain, s, data)
        assert (a["loss"], a["grad_norm"], a["masked_tokens"]) == (b["loss"], b["grad_norm"], b["masked_tokens"])
    # before that the mask matters (same noise: the same masked positions)
    a, b = step_at(annealed, 0, data), step_at(plain, 0, data)
    assert a["masked_tokens"] == b["masked_tokens"] and abs(a["loss"] - b["loss"]) > 1e-3


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_first_step_of_a_long_annealing_is_the_causal_model(task):
    data = batch(task)
    annealed = make_trainer(2**30, task=task)
    np.testing.assert_array_equal(np.asarray(annealed.visible_mask(0)), np.tril(np.ones((LENGTH, LENGTH), bool)))
    causal = make_trainer(0, task=task, model=MODEL.replace(attention_type="causal"))
    a, b = step_at(annealed, 0, data), step_at(causal, 0, data)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


def test_step_loss_equals_a_loss_computed_from_the_reference_mask():
    n, s, seed = 4, 1, 3
    data = batch()
    trainer = make_trainer(n, seed=seed)
    got = step_at(trainer, s, data)["loss"]
    # the same loss from the model called directly with the rebuilt mask and the step's noise (seed, step, row)
    params = trainer.init_state(0).params
    model = nnx.merge(trainer.graphdef, jax.tree.map(np.asarray, params))
    noise_key, _ = step_keys(seed, s)
    noisy, masked, p_mask = [], [], []
    for r, row in enumerate(data["input_ids"]):
        x, m, p = forward_process(jax.random.fold_in(noise_key, r), jnp.asarray(row)[None], mask_id=MODEL.mask_token_id,
                                  eps=1e-3)
        noisy.append(x[0]), masked.append(m[0]), p_mask.append(p[0])
    noisy, masked, p_mask = jnp.stack(noisy), jnp.stack(masked), jnp.stack(p_mask)
    mask = reference_mask(seed, s, LENGTH, n)
    assert 0.2 < mask[np.triu_indices(LENGTH, 1)].mean() < 0.8  # a partly annealed mask
    want = pretraining_loss(model(noisy, visible=jnp.asarray(mask)), jnp.asarray(data["input_ids"]), masked, p_mask)
    np.testing.assert_allclose(got, float(want), rtol=1e-5)
    unmasked = pretraining_loss(model(noisy), jnp.asarray(data["input_ids"]), masked, p_mask)
    assert abs(float(unmasked) - float(want)) > 1e-3  # the comparison can fail


def test_mask_is_shared_by_the_micro_batches_and_compiled_once():
    data = batch()
    full = make_trainer(4)
    micro = make_trainer(4, batch_size=2, accumulation=4)
    for s in (0, 1):
        np.testing.assert_allclose(step_at(micro, s, data, accumulation=4)["loss"], step_at(full, s, data)["loss"],
                                   rtol=1e-5)
    state = full.init_state(0)
    for _ in range(6):  # through the annealing and past it: one program
        state, _ = full.step(state, jax.device_put({"input_ids": data["input_ids"][None]}, full.batch_sharding))
    assert int(state.step) == 6 and full._step_fn._cache_size() == 1


def test_eval_loss_uses_the_fully_annealed_model():
    data = jax.tree.map(lambda x: x[None], batch())
    a, b = make_trainer(100), make_trainer(0)
    params = a.init_state(0).params
    assert float(a.eval_loss(params, jax.device_put(data, a.batch_sharding), 0)) == float(
        b.eval_loss(params, jax.device_put(data, b.batch_sharding), 0))


@pytest.mark.parametrize("value", [-1, True, None])
def test_validate_names_mask_annealing_steps(pretrain_data, value):
    from llada_jax.errors import ConfigError
    from llada_jax.train.loop import validate

    c = train_config()
    c.output_dir, c.data_path, c.max_length = "unused", pretrain_data, 32
    c.adaptation.mask_annealing_steps = 5
    validate(c)
    c.adaptation.mask_annealing_steps = value
    with pytest.raises(ConfigError, match="adaptation.mask_annealing_steps must be an integer >= 0"):
        validate(c)


def test_resume_during_annealing_is_bitwise_identical(tmp_path, pretrain_data):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    args = ("--save_steps", "4", "--config.adaptation.mask_annealing_steps=6")
    cli(*common(pretrain_data, straight, 8, *args))
    killed = cli(*common(pretrain_data, resumed, 8, *args), kill_after_step=6, check=False)
    assert killed.returncode == -signal.SIGKILL and checkpoint_steps(resumed) == [4]
    cli(*common(pretrain_data, resumed, 8, *args))  # resumes from step 4, in the middle of the annealing
    a, b = losses(straight), losses(resumed)
    assert [s for s, _, _ in b] == list(range(1, 9)) and a == b
