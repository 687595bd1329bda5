"""The jitted train step: accumulation, sharding, the non-finite guard, the random-length cut, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import sharding
from llada_jax.config import LLaDAConfig, train_config
from llada_jax.train.step import Trainer, flops_per_token

LENGTH = 32
MODEL = LLaDAConfig.tiny()


def make_trainer(batch_size=8, accumulation=1, mesh=(1, 1, 1), task="pretrain", model=MODEL, **overrides):
    c = train_config(model, task=task)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = batch_size, accumulation, LENGTH
    c.learning_rate, c.warmup_steps, c.max_steps = 3e-3, 2, 100
    c.random_length_prob = 0.0
    for k, v in overrides.items():
        c[k] = v
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    devices = jax.devices()[: int(np.prod(mesh))]
    return Trainer(c, model, sharding.make_mesh(c.mesh, devices))


def batches(steps, rows=8, seed=0, task="pretrain"):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(steps):
        b = {"input_ids": rs.randint(0, 500, (rows, LENGTH)).astype(np.int32)}
        if task == "sft":
            prompt = rs.randint(1, LENGTH // 2, rows).astype(np.int32)
            b["prompt_lengths"], b["answer_lengths"] = prompt, (LENGTH - prompt).astype(np.int32)
        out.append(b)
    return out


def run(trainer, data, accumulation=1):
    state = trainer.init_state(0)
    losses = []
    for b in data:
        shaped = {k: v.reshape((accumulation, -1) + v.shape[1:]) for k, v in b.items()}
        state, metrics = trainer.step(state, jax.device_put(shaped, trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return losses, state


def assert_same_training(expected, got):
    """Two runs' (losses, state) agree up to float32 summation order: the losses to 1e-5 relative (the reductions
    split differently over micro-batches or devices); the parameters to 1e-4, as Adam normalises each coordinate,
    so rounding differences of near-zero gradients can move a parameter by a fraction of one step (lr 3e-3)."""
    (losses, state), (other_losses, other_state) = expected, got
    np.testing.assert_allclose(other_losses, losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(other_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_gradient_accumulation_equals_the_full_batch(task):
    data = batches(3, task=task)
    assert_same_training(run(make_trainer(8, 1, task=task), data),
                         run(make_trainer(2, 4, task=task), data, accumulation=4))


def test_eight_device_mesh_equals_one_device():
    data = batches(3)
    sharded_trainer = make_trainer(mesh=(2, 2, 2))
    sharded, s8 = run(sharded_trainer, data)
    assert_same_training(run(make_trainer(mesh=(1, 1, 1)), data), (sharded, s8))
    # parameters and optimizer moments really are sharded
    ff = s8.params["blocks"]["ff_proj"]
    assert ff.sharding.spec == jax.P(None, "fsdp", "tensor")
    mu = s8.opt_state[1][0].mu["blocks"]["ff_proj"]
    assert mu.sharding.spec == ff.sharding.spec


def test_loss_falls_on_a_repeated_batch():
    trainer = make_trainer()
    data = batches(1) * 30
    losses, _ = run(trainer, data)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_nonfinite_loss_skips_the_update_and_counts():
    trainer = make_trainer()
    state = trainer.init_state(0)
    good = jax.device_put({"input_ids": batches(1)[0]["input_ids"][None]}, trainer.batch_sharding)
    state, m = trainer.step(state, good)
    assert not bool(m["update_skipped"])
    # poison one embedding row: any batch containing that token gives a NaN loss
    params = state.params
    params["wte"] = params["wte"].at[7].set(jnp.nan)
    state = state.replace(params=params)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    poisoned = jax.device_put({"input_ids": np.full((1, 8, LENGTH), 7, np.int32)}, trainer.batch_sharding)
    for streak in (1, 2):
        state, m = trainer.step(state, poisoned)
        assert bool(m["update_skipped"]) and int(m["nonfinite_streak"]) == streak
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)  # nothing moved
    assert int(state.step) == 3 and int(state.nonfinite_total) == 2
    # the learning-rate schedule advances with applied updates only
    state, m = trainer.step(state, good)
    assert int(m["nonfinite_streak"]) == 0
    assert float(m["learning_rate"]) == pytest.approx(float(trainer.schedule(1)))


def test_random_length_cut_ignores_positions_past_the_cut_without_recompiling():
    trainer = make_trainer(random_length_prob=1.0)  # every step cuts its batch to a random length
    steps = 3
    masks = [np.asarray(trainer.length_mask(s)) for s in range(steps)]  # what step s keeps
    cuts = [int(m[0].sum()) for m in masks]
    for m, c in zip(masks, cuts):
        np.testing.assert_array_equal(m, np.broadcast_to(np.arange(LENGTH) < c, (8, LENGTH)))  # a prefix
    assert all(c < LENGTH for c in cuts) and len(set(cuts)) > 1, cuts  # real cuts, and of different lengths
    data = batches(steps)
    rs = np.random.RandomState(1)
    changed = []
    for b, c in zip(data, cuts):  # other tokens everywhere past the step's cut
        ids = b["input_ids"].copy()
        ids[:, c:] = (ids[:, c:] + rs.randint(1, 500, ids[:, c:].shape)) % 500
        changed.append({"input_ids": ids})

    def run_steps(batches_):
        state = trainer.init_state(0)
        out = []
        for b in batches_:
            state, m = trainer.step(state, jax.device_put({"input_ids": b["input_ids"][None]},
                                                          trainer.batch_sharding))
            out.append((float(m["loss"]), float(m["grad_norm"]), int(m["masked_tokens"])))
        return out, jax.tree.map(np.asarray, state.params)

    (metrics, params), (metrics_changed, params_changed) = run_steps(data), run_steps(changed)
    # the same loss and gradient norm at every step and the same parameters after three updates, bit for bit:
    # tokens past the cut reach neither the loss nor (through attention) the kept positions
    assert metrics == metrics_changed
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_changed)):
        np.testing.assert_array_equal(a, b)
    assert all(0 < n <= 8 * c for (_, _, n), c in zip(metrics, cuts))  # only kept positions are masked
    # one compilation for all steps: the cut is a mask over fixed shapes, not a new sequence length
    assert trainer._step_fn._cache_size() == 1
    # without the cut the changed tokens do count (the comparison above can fail)
    uncut = make_trainer(random_length_prob=0.0)
    assert run(uncut, changed[:1])[0] != run(uncut, data[:1])[0]


def test_flops_per_token_counts_the_8b_model():
    c = LLaDAConfig.llada_8b()
    # matmul params = all params minus the embedding table: 8,015,581,184 - 126464 * 4096 - norms
    norms = (2 * 32 + 1) * 4096
    matmul = 8_015_581_184 - 126464 * 4096 - norms
    assert flops_per_token(c, 4096) == 6 * matmul + 12 * 32 * 4096 * 4096


def test_flops_per_token_with_lora_drops_the_base_weight_gradients():
    from llada_jax.config import LoRAConfig

    c = LLaDAConfig.llada_8b()
    matmul = 8_015_581_184 - 126464 * 4096 - (2 * 32 + 1) * 4096
    adapters = 41_943_040  # rank 16 on the seven projections of 32 blocks (configs/llada_8b_lora_sft.py)
    assert flops_per_token(c, 4096, LoRAConfig(rank=16)) == 4 * matmul + 6 * adapters + 12 * 32 * 4096 * 4096


def test_router_metrics_of_a_moe_model_are_summed_over_micro_batches():
    """A MoE model's step reports the experts' balance; 4 micro-batches of 2 rows give the numbers of one of 8 (the
    counts are summed, not those of the last micro-batch). A dense model's step has no such metrics."""
    data = batches(2)
    metrics = []
    for accumulation in (1, 4):
        trainer = make_trainer(8 // accumulation, accumulation, model=LLaDAConfig.tiny_moe())
        state, logged = trainer.init_state(0), []
        for b in data:
            shaped = {k: v.reshape((accumulation, -1) + v.shape[1:]) for k, v in b.items()}
            state, m = trainer.step(state, jax.device_put(shaped, trainer.batch_sharding))
            logged.append({k: float(v) for k, v in m.items() if k.startswith("moe_")})
        metrics.append(logged)
    assert metrics[0] == metrics[1]
    for m in metrics[0]:
        assert set(m) == {"moe_max_over_mean_load", "moe_unused_experts"}
        # 8 experts, 2 per token: the busiest at most 4 times the mean
        assert 1 <= m["moe_max_over_mean_load"] <= 4 and 0 <= m["moe_unused_experts"] < 1, m
    dense = make_trainer()
    _, dense_metrics = dense.step(dense.init_state(0), jax.device_put({"input_ids": data[0]["input_ids"][None]},
                                                                       dense.batch_sharding))
    assert not [k for k in dense_metrics if k.startswith("moe_")]


def test_flops_per_token_of_a_moe_model_count_its_active_parameters():
    """6 x the active matmul parameters (`count_active_params` less the embedding, the norms and the expert bias):
    the routed experts a token is not sent to do not count."""
    from flax import nnx, traverse_util

    from llada_jax.model import abstract_model, count_active_params

    for c in (LLaDAConfig.tiny_moe(), LLaDAConfig.llada2_mini()):
        params = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_model(c)[1]))
        not_matmul = sum(int(np.prod(x.shape)) for path, x in params.items()
                         if path[-1] in ("wte", "ln_f", "expert_bias") or path[-1].endswith("norm"))
        attention = 12 * c.n_layers * 256 * c.d_model
        assert flops_per_token(c, 256) == 6 * (count_active_params(c) - not_matmul) + attention
