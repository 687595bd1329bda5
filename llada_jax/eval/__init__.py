"""Evaluation: the conditional log-likelihood estimator and greedy check (`likelihood`), the
lm-evaluation-harness adapter (`lm_eval_adapter`), and analysis tools (`analysis`: attention maps, sampler
comparison). `llada-jax eval-likelihood` is registered by `cli`."""

from llada_jax.eval.likelihood import Likelihood, greedy_check, log_likelihood

__all__ = ["Likelihood", "greedy_check", "log_likelihood"]
