"""`llada-jax model-info`: the size of a model preset, counted without allocating it."""

from __future__ import annotations


def register(sub) -> None:
    from llada_jax.config import PRESETS

    p = sub.add_parser("model-info", help="parameter count and shape of a model preset or config")
    p.add_argument("--preset", default="llada_8b", help=f"{' | '.join(PRESETS)} (default: llada_8b)")
    p.set_defaults(func=run)


def run(args) -> int:
    from llada_jax.config import LLaDAConfig
    from llada_jax.model import count_active_params, count_params

    try:
        config = LLaDAConfig.preset(args.preset)
    except ValueError as e:
        from llada_jax.errors import UsageError

        raise UsageError(str(e)) from e
    n = count_params(config)
    c = config
    if c.is_moe:
        print(f"preset {args.preset}: {n:,} parameters, {count_active_params(c):,} active per token")
    else:
        print(f"preset {args.preset}: {n:,} parameters")
    print(f"  d_model {c.d_model}, n_layers {c.n_layers}, n_heads {c.n_heads}, n_kv_heads {c.effective_n_kv_heads}, "
          f"head_dim {c.head_dim}, mlp_hidden_size {c.mlp_hidden_size}, vocab {c.padded_vocab_size}, "
          f"max_sequence_length {c.max_sequence_length}")
    if c.is_moe:
        print(f"  experts: {c.num_experts} of {c.expert_hidden_size}, {c.experts_per_token} per token, "
              f"{c.num_shared_experts} shared, the first {c.first_dense_layers} layer(s) dense; router "
              f"{c.router_score}, {c.router_groups} group(s) ({c.router_topk_groups} kept), scale {c.router_scale:g}")
    return 0
