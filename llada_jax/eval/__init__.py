"""Evaluation: the conditional log-likelihood estimator and greedy check (`likelihood`), the
lm-evaluation-harness adapter (`lm_eval_adapter`), and analysis tools (`analysis`: attention maps, sampler
comparison). `llada-jax eval-likelihood` is registered by `cli`.

`log_likelihood`, `greedy_check` and `Likelihood` load on first use, so the command's parser (which imports
this package) stays light.
"""

__all__ = ["Likelihood", "greedy_check", "log_likelihood"]


def __getattr__(name):
    if name in __all__:
        from llada_jax.eval import likelihood

        return getattr(likelihood, name)
    raise AttributeError(f"module 'llada_jax.eval' has no attribute {name!r}")
