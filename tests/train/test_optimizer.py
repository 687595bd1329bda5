"""AdamW with weight decay on matrices only, and the learning-rate schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.config import train_config
from llada_jax.train.optimizer import learning_rate_schedule
from tests.train.test_step import MODEL, make_trainer


def test_weight_decay_skips_norm_gains():
    # the run's own optimizer (make_optimizer, built by the Trainer): with zero gradients only the decoupled
    # weight decay moves parameters, by -lr * weight_decay * p on matrices and not at all on norm gains
    trainer = make_trainer(learning_rate=1.0, warmup_steps=0, lr_scheduler_type="constant")
    state = trainer.init_state(0)
    grads = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = trainer.tx.update(grads, state.opt_state, state.params)
    decay = trainer.config.optimizer.weight_decay
    assert decay > 0
    assert float(jnp.abs(updates["blocks"]["attn_norm"]).max()) == 0.0
    assert float(jnp.abs(updates["ln_f"]).max()) == 0.0
    for name in ("q_proj", "ff_out"):
        np.testing.assert_allclose(updates["blocks"][name], -decay * state.params["blocks"][name], rtol=1e-6)
    np.testing.assert_allclose(updates["wte"], -decay * state.params["wte"], rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_learning_rate_schedules(kind):
    c = train_config(MODEL)
    c.learning_rate, c.warmup_steps, c.max_steps, c.lr_scheduler_type = 1.0, 10, 110, kind
    c.optimizer.min_lr_ratio, c.optimizer.decay_fraction = 0.1, 0.2
    lr = learning_rate_schedule(c)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    end = float(lr(110))
    if kind == "constant":
        assert end == pytest.approx(1.0)
    else:
        assert end == pytest.approx(0.1, abs=1e-6)
    if kind == "cosine":
        assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way down the cosine
    if kind == "linear":
        assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)
    if kind == "wsd":
        assert float(lr(88)) == pytest.approx(1.0) and float(lr(99)) == pytest.approx(0.55, abs=1e-6)
