"""Jitted LLaDA samplers (fixed-length, semi-autoregressive padding and origin, block diffusion, LLaDA 2.x's
decoding with token editing), batch sampling and chat.

`generate(model, prompt_ids, ...)` and `create_sampler(method, **options)` are the API; `cli` registers the
`sample` and `inference` commands.
"""

from llada_jax.sampling.samplers import (
                                         BLOCK_METHODS,
                                         METHODS,
                                         REMASKING,
                                         Sampler,
                                         SamplerOptions,
                                         SampleStats,
                                         create_sampler,
                                         generate,
)

__all__ = ["BLOCK_METHODS", "METHODS", "REMASKING", "SampleStats", "Sampler", "SamplerOptions", "create_sampler",
           "generate"]
