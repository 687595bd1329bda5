"""`llada-jax model-info`: the size of a model preset, counted without allocating it."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("model-info", help="parameter count and shape of a model preset or config")
    p.add_argument("--preset", default="llada_8b", help="tiny | llada_8b (default: llada_8b)")
    p.set_defaults(func=run)


def run(args) -> int:
    from llada_jax.config import LLaDAConfig
    from llada_jax.model import count_params

    try:
        config = LLaDAConfig.preset(args.preset)
    except ValueError as e:
        from llada_jax.errors import UsageError

        raise UsageError(str(e)) from e
    n = count_params(config)
    print(f"preset {args.preset}: {n:,} parameters")
    print(f"  d_model {config.d_model}, n_layers {config.n_layers}, n_heads {config.n_heads}, "
          f"n_kv_heads {config.effective_n_kv_heads}, mlp_hidden_size {config.mlp_hidden_size}, "
          f"vocab {config.padded_vocab_size}, max_sequence_length {config.max_sequence_length}")
    return 0
