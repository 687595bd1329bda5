"""The objective's optional terms and the experts' balancing: complementary masking, the confidence (CAP) term, the
auxiliary router losses and the expert-bias update, against numpy and through the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from llada_jax import sharding
from llada_jax.config import LLaDAConfig, train_config
from llada_jax.diffusion import complementary_masking, confidence_loss, forward_process
from llada_jax.errors import ConfigError
from llada_jax.model import RouterStats, expert_bias_update, load_balance_loss, router_z_loss
from llada_jax.train.loop import validate
from llada_jax.train.step import Trainer, bias_update_rate

LENGTH = 16
MOE = LLaDAConfig.tiny_moe()


def make_trainer(model=LLaDAConfig.tiny(), task="sft", learning_rate=3e-3, **settings):
    c = train_config(model, task=task)
    c.batch_size, c.gradient_accumulation_steps, c.max_length = 8, 1, LENGTH
    c.learning_rate, c.warmup_steps, c.max_steps, c.random_length_prob = learning_rate, 0, 100, 0.0
    for dotted, value in settings.items():
        group, name = dotted.split("__")
        c[group][name] = value
    return Trainer(c, model, sharding.make_mesh(c.mesh, jax.devices()[:1]))


def sft_batch(seed=0):
    rs = np.random.RandomState(seed)
    prompt = rs.randint(1, LENGTH // 2, 8).astype(np.int32)
    return {"input_ids": rs.randint(0, 500, (1, 8, LENGTH)).astype(np.int32), "prompt_lengths": prompt[None],
            "answer_lengths": (LENGTH - prompt)[None].astype(np.int32)}


def step(trainer, batch, state=None):
    state = trainer.init_state(0) if state is None else state
    return trainer.step(state, jax.device_put(batch, trainer.batch_sharding))


# ------------------------------------------------------------------------------------------ complementary masking

def test_a_complementary_pair_masks_every_answer_token_exactly_once():
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(0, 100, (16, 24)))
    prompt = jnp.asarray(rs.randint(0, 12, 16))
    maskable = jnp.arange(24)[None, :] >= prompt[:, None]
    noisy, masked, p_mask = forward_process(jax.random.key(0), ids, mask_id=126, prompt_lengths=prompt)
    noisy_c, masked_c, p_mask_c = complementary_masking(ids, masked, p_mask, maskable, mask_id=126)
    np.testing.assert_array_equal(masked.astype(int) + masked_c.astype(int), maskable.astype(int))
    np.testing.assert_array_equal(noisy_c, np.where(masked_c, 126, ids))
    np.testing.assert_allclose(p_mask_c, 1 - p_mask)
    assert not bool(jnp.any(masked_c & ~maskable))  # the prompt stays clean in both copies


def test_the_complementary_step_trains_every_answer_token_once_per_pair():
    """The step's masked tokens are exactly the batch's answer tokens (the pair covers each once), and its loss is
    the mean of the two copies' diffusion losses: the first copy alone is the plain step's loss."""
    batch = sft_batch()
    plain = make_trainer()
    _, m_plain = step(plain, batch)
    _, m_pair = step(make_trainer(loss__complementary_masking=True), batch)
    assert int(m_pair["masked_tokens"]) == int(batch["answer_lengths"].sum())
    assert int(m_plain["masked_tokens"]) < int(m_pair["masked_tokens"])
    assert float(m_pair["loss"]) != pytest.approx(float(m_plain["loss"]), rel=1e-3)


# ------------------------------------------------------------------------------------------------ confidence term

def numpy_confidence(logits, ids, masked):
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    right = np.asarray(masked) & (logits.argmax(-1) == np.asarray(ids))
    return (entropy[right].mean() if right.any() else 0.0), right.sum()


def test_the_confidence_term_equals_numpy():
    rs = np.random.RandomState(1)
    logits = rs.normal(0, 2, (4, 10, 7)).astype(np.float32)
    ids = np.where(rs.rand(4, 10) < 0.5, logits.argmax(-1), rs.randint(0, 7, (4, 10)))  # about half right
    masked = rs.rand(4, 10) < 0.6
    got, n = confidence_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(masked))
    want, want_n = numpy_confidence(logits, ids, masked)
    assert int(n) == want_n > 0
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    none, n = confidence_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.zeros((4, 10), bool))
    assert (float(none), int(n)) == (0.0, 0)


def test_the_step_adds_beta_times_the_confidence_entropy():
    """Same noise, same parameters: the step with confidence_beta = 2 reports the entropy term and its loss is the
    plain loss plus 2 x that term (a model that already predicts some tokens right)."""
    batch = sft_batch()
    plain = make_trainer()
    state, _ = step(plain, batch)
    for _ in range(20):  # a few steps on the batch, so that some masked tokens are predicted right
        state, _ = step(plain, batch, state)
    params = jax.tree.map(jnp.copy, state.params)
    _, m_plain = step(plain, batch, plain.state_from_params(params))  # step 0: the same noise as the other's
    cap = make_trainer(loss__confidence_beta=2.0)
    _, m_cap = step(cap, batch, cap.state_from_params(params))
    entropy = float(m_cap["confidence_entropy"])
    assert entropy > 0
    np.testing.assert_allclose(float(m_cap["loss"]), float(m_plain["loss"]) + 2.0 * entropy, rtol=1e-5)


# --------------------------------------------------------------------------------------------- the router losses

def random_stats(seed=0, layers=3, experts=8, k=2, tokens=20):
    rs = np.random.RandomState(seed)
    logits = rs.normal(0, 1, (layers, tokens, experts)).astype(np.float32)
    chosen = np.argsort(-logits, -1)[..., :k]
    load = np.stack([np.bincount(c.ravel(), minlength=experts) for c in chosen]).astype(np.float32)
    scores = 1 / (1 + np.exp(-logits))
    scores /= scores.sum(-1, keepdims=True)
    lse = np.log(np.exp(logits).sum(-1))
    stats = RouterStats(jnp.asarray(load), jnp.asarray(scores.sum(1)), jnp.asarray((lse**2).sum(1)))
    return stats, load, scores, lse, tokens, experts, k


def test_the_router_losses_equal_numpy():
    stats, load, scores, lse, tokens, experts, k = random_stats()
    f = load / tokens  # the fraction of tokens sent to each expert (summed over the k choices)
    p = scores.mean(1)
    np.testing.assert_allclose(float(load_balance_loss(stats, k)), np.mean(experts * (f * p).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(float(router_z_loss(stats, k)), np.mean((lse**2).mean(1)), rtol=1e-5)
    balanced = RouterStats(jnp.full((1, 8), 5.0), jnp.full((1, 8), 20 / 8), jnp.zeros(1))  # 20 tokens, k = 2
    np.testing.assert_allclose(float(load_balance_loss(balanced, 2)), 2.0, rtol=1e-6)  # k when balanced


def test_the_balance_loss_trains_the_router_and_reports_its_terms():
    """With the auxiliary losses on, the step reports them, its loss includes them, and the router gets a gradient
    from them (a different update from the plain step's)."""
    batch = {"input_ids": np.random.RandomState(0).randint(0, 500, (1, 8, LENGTH)).astype(np.int32)}
    plain = make_trainer(MOE, "pretrain", moe__bias_update_rate=0.0)
    aux = make_trainer(MOE, "pretrain", moe__bias_update_rate=0.0, moe__load_balance_loss=0.5, moe__router_z_loss=0.1)
    s_plain, m_plain = step(plain, batch)
    s_aux, m_aux = step(aux, batch)
    lb, z = float(m_aux["moe_load_balance_loss"]), float(m_aux["moe_router_z_loss"])
    assert 2.0 <= lb <= 8.0 and z > 0  # k (balanced) .. E (every token to the same experts) for top-2 of 8
    np.testing.assert_allclose(float(m_aux["loss"]), float(m_plain["loss"]) + 0.5 * lb + 0.1 * z, rtol=1e-5)
    router = ("blocks", "mlp", "router")
    get = lambda s: traverse_util.flatten_dict(s.params)[router]  # noqa: E731
    assert not np.allclose(get(s_plain), get(s_aux))


# ------------------------------------------------------------------------------------------- the expert bias

def test_the_bias_update_is_a_sign_step_toward_the_mean_load():
    load = jnp.asarray([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(expert_bias_update(load, 0.01), np.float32([[-0.01, 0.01, 0, 0], [0, 0, 0, 0]]))


def test_the_default_bias_rate_follows_the_model_and_lora():
    c = train_config(MOE)
    assert bias_update_rate(c, MOE) == 1e-3
    c.lora.enabled = True
    assert bias_update_rate(c, MOE) == 0.0
    assert bias_update_rate(train_config(LLaDAConfig.tiny()), LLaDAConfig.tiny()) == 0.0
    assert bias_update_rate(train_config(MOE.replace(router_expert_bias=False)),
                            MOE.replace(router_expert_bias=False)) == 0.0


def test_the_bias_update_balances_a_skewed_fixed_router():
    """A router that sends most tokens to a few experts (its weights scaled up), learning rate 0 so that nothing but
    the bias moves: after each step the bias moves by the sign rule, and the load tends to uniform."""
    model = MOE.replace(router_groups=1, router_topk_groups=1)
    trainer = make_trainer(model, "pretrain", learning_rate=0.0, moe__bias_update_rate=0.01)
    flat = traverse_util.flatten_dict(trainer.init_state(0).params)
    router = ("blocks", "mlp", "router")
    flat[router] = flat[router] * 3.0  # sharper scores: a few experts take most tokens
    state = trainer.state_from_params(traverse_util.unflatten_dict(flat))
    batch = {"input_ids": np.random.RandomState(0).randint(0, 500, (1, 8, LENGTH)).astype(np.int32)}
    balance, biases = [], []
    for _ in range(120):
        biases.append(np.asarray(traverse_util.flatten_dict(state.params)[("blocks", "mlp", "expert_bias")]))
        state, m = step(trainer, batch, state)
        balance.append(float(m["moe_max_over_mean_load"]))
    moved = biases[1] - biases[0]
    np.testing.assert_allclose(np.abs(moved), np.where(np.abs(moved) > 0.005, 0.01, 0.0), atol=1e-6)  # +-rate or 0
    assert (np.abs(moved) > 0.005).mean() > 0.5
    assert balance[0] > 2.0 and np.mean(balance[-20:]) < 0.7 * balance[0], balance

    np.testing.assert_array_equal(traverse_util.flatten_dict(state.params)[router], flat[router])  # fixed router


# ---------------------------------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("model,task,setting,message", [
    ("tiny", "pretrain", "loss.complementary_masking=true", "loss.complementary_masking is set, but task is 'pretrain'"),
    ("tiny", "sft", "moe.load_balance_loss=0.01", "moe.load_balance_loss is set, but the model has no experts"),
    ("tiny_moe", "sft", "moe.bias_update_rate=-2", "moe.bias_update_rate must be a finite number >= 0"),
    ("tiny_moe", "sft", "loss.confidence_beta=-1", "loss.confidence_beta must be a finite number >= 0"),
    ("tiny_moe", "sft", "moe.router_z_loss=-0.5", "moe.router_z_loss must be a finite number >= 0"),
])
def test_bad_objective_settings_name_the_field(tmp_path, model, task, setting, message):
    from llada_jax.config import apply_overrides, override_keys, sft_defaults

    c = train_config(LLaDAConfig.preset(model), task=task)
    if task == "sft":
        sft_defaults(c)
    (tmp_path / "data.jsonl").write_text('{"input_ids": [1, 2, 3], "prompt_length": 1}\n')
    c.data_path, c.output_dir, c.max_length = str(tmp_path / "data.jsonl"), str(tmp_path / "never"), 64
    overrides = [f"--config.{setting}"]
    apply_overrides(c, overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(c, override_keys(overrides))


def test_the_bias_rate_of_a_lora_run_is_an_error():
    from llada_jax.config import unused_settings

    from llada_jax.config import sft_defaults

    c = sft_defaults(train_config(MOE, task="sft"))
    c.lora.enabled = True
    c.moe.bias_update_rate = 0.01
    assert "moe.bias_update_rate is set, but lora.enabled is true" in unused_settings(c, MOE)
