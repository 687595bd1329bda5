"""The LoRA train step: only the adapters train (the base bitwise unchanged, optimizer state for the adapters only),
with gradient accumulation and on an 8-device mesh as on one device, the non-finite guard, a bfloat16 base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import sharding
from llada_jax.config import LLaDAConfig, train_config
from llada_jax.model import LLaDAForMaskedLM
from llada_jax.train.step import Trainer
from tests.train.test_step import LENGTH, assert_same_training, batches, run

MODEL = LLaDAConfig.tiny()


def lora_trainer(batch_size=8, accumulation=1, mesh=(1, 1, 1), task="sft", model=MODEL, dropout=0.1):
    c = train_config(model, task=task)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = batch_size, accumulation, LENGTH
    c.learning_rate, c.warmup_steps, c.max_steps, c.random_length_prob = 1e-2, 2, 100, 0.0
    c.lora.enabled, c.lora.rank, c.lora.dropout = True, 4, dropout
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    trainer = Trainer(c, model, sharding.make_mesh(c.mesh, jax.devices()[: int(np.prod(mesh))]))
    trainer.set_frozen(LLaDAForMaskedLM(model, rngs=nnx.Rngs(0)))
    return trainer


def copy_task():
    """Rows of one repeated token each: a task the adapters alone learn in a few steps (on a random base)."""
    b = batches(1, task="sft")[0]
    b["input_ids"] = np.repeat((100 + 7 * np.arange(8, dtype=np.int32))[:, None], LENGTH, axis=1)
    return b


def host(tree):
    return jax.tree.map(np.asarray, tree)


def test_only_the_adapters_train_and_the_base_is_bitwise_unchanged():
    trainer = lora_trainer()
    base_before = host(trainer.frozen)
    state = trainer.init_state(0)
    adapters_before = host(state.params)
    assert set(state.params) == {"blocks"} and set(state.params["blocks"]) == {"adapters"}
    # the optimizer holds moments of the adapters only
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_moments == 2 * n_adapter
    losses, state = run(trainer, [copy_task()] * 25)
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(host(trainer.frozen))):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters_before), jax.tree.leaves(host(state.params)))]
    assert all(moved)  # A and B of every target
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_gradient_accumulation_equals_the_full_batch_with_dropout(task):
    """Dropout masks are keyed by (seed, step, row): micro-batching does not change them."""
    data = batches(3, task=task)
    assert_same_training(run(lora_trainer(8, 1, task=task), data),
                         run(lora_trainer(2, 4, task=task), data, accumulation=4))


def test_eight_device_mesh_equals_one_device():
    data = batches(3, task="sft")
    trainer = lora_trainer(mesh=(2, 2, 2))
    sharded, s8 = run(trainer, data)
    assert_same_training(run(lora_trainer(mesh=(1, 1, 1)), data), (sharded, s8))
    # the adapters shard like their projections (B's output over tensor), the base stays sharded as it was placed
    b = s8.params["blocks"]["adapters"]["ff_proj"]["lora_b"]
    assert b.sharding.spec == jax.P(None, None, "tensor")
    assert trainer.frozen["blocks"]["ff_proj"].sharding.spec == jax.P(None, "fsdp", "tensor")


def test_nonfinite_adapters_skip_the_update():
    trainer = lora_trainer()
    state = trainer.init_state(0)
    good = jax.device_put({k: v[None] for k, v in batches(1, task="sft")[0].items()}, trainer.batch_sharding)
    state, m = trainer.step(state, good)
    assert not bool(m["update_skipped"])
    params = state.params
    params["blocks"]["adapters"]["q_proj"]["lora_a"] = params["blocks"]["adapters"]["q_proj"]["lora_a"].at[0, 0, 0].set(
        jnp.nan)
    state = state.replace(params=params)
    before = host((state.params, state.opt_state))
    state, m = trainer.step(state, good)
    assert bool(m["update_skipped"]) and int(m["nonfinite_streak"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(host((state.params, state.opt_state)))):
        np.testing.assert_array_equal(a, b)


def test_a_bfloat16_base_with_float32_adapters():
    model = MODEL.replace(param_dtype="bfloat16", dtype="bfloat16")
    trainer = lora_trainer(model=model)
    assert {x.dtype for x in jax.tree.leaves(trainer.frozen)} == {jnp.dtype(jnp.bfloat16)}
    losses, state = run(trainer, [copy_task()] * 15)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}  # the masters
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim > 0} == {jnp.dtype(jnp.float32)}
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_a_base_of_other_shapes_is_refused():
    trainer = lora_trainer()
    with pytest.raises(ValueError, match=r"base model's parameter blocks.ff_out is float32\[2, 128, 64\], but the run's model has "
                                         r"float32\[2, 192, 64\]"):
        trainer.set_frozen(LLaDAForMaskedLM(MODEL.replace(mlp_hidden_size=128), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("policy", ["full", "save_dots_no_batch"])
def test_remat_gives_the_losses_without_remat(policy):
    data = batches(3, task="sft")
    plain, s1 = run(lora_trainer(), data)
    remat, s2 = run(lora_trainer(model=MODEL.replace(remat_policy=policy)), data)
    np.testing.assert_allclose(remat, plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
