"""llada-jax: LLaDA, the large language diffusion model, in JAX / Flax NNX.

The public API: `LLaDAForMaskedLM` (with `from_pretrained`), `create_sampler`,
`TokenizerHelper`, `DatasetConverter`, `ModelAnalyzer` (the last three load their modules on first use).
"""

import importlib

from llada_jax.config import LLaDAConfig
from llada_jax.model import LLaDAForMaskedLM
from llada_jax.sampling import create_sampler, generate

_LAZY = {"TokenizerHelper": "llada_jax.tokenizer", "DatasetConverter": "llada_jax.data.converters",
         "ModelAnalyzer": "llada_jax.eval.analysis"}

__version__ = "0.1.0"
__all__ = ["LLaDAConfig", "LLaDAForMaskedLM", "create_sampler", "generate", *_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llada_jax' has no attribute {name!r}")
