"""AdamW with gradient clipping and the learning-rate schedules (warmup, then cosine / linear / constant / WSD)."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup from 0 to the peak over `warmup_steps`, then the configured decay until `max_steps`.

    cosine / linear decay to `min_lr_ratio` x peak at max_steps; constant holds the peak; wsd
    (warmup-stable-decay) holds the peak and decays linearly to min_lr_ratio x peak over the last
    `decay_fraction` of the steps.
    """
    kind = config.lr_scheduler_type
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type: expected one of {SCHEDULES}, got {kind!r}")
    peak, total = float(config.learning_rate), int(config.max_steps)
    warmup = min(int(config.warmup_steps), total)
    floor = peak * float(config.optimizer.min_lr_ratio)
    after = max(total - warmup, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, after, alpha=floor / peak if peak else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, floor, after)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        decay_steps = max(int(round(total * float(config.optimizer.decay_fraction))), 1)
        stable = max(after - decay_steps, 0)
        decay = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)], [stable])
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(param_axes) -> object:
    """Weight decay on matrices only: parameters whose logical axes include "norm" (RMSNorm gains) are
    excluded, whether scanned ([layers, d]) or not ([d])."""
    return jax.tree.map(lambda axes: "norm" not in axes, param_axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(config, param_axes) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (betas, eps and weight decay from `config.optimizer`)."""
    o = config.optimizer
    chain = []
    if o.grad_clip and o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(float(o.grad_clip)))
    chain.append(optax.adamw(learning_rate_schedule(config), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                             weight_decay=float(o.weight_decay), mask=decay_mask(param_axes)))
    return optax.chain(*chain)
