"""llada-jax: LLaDA, the large language diffusion model, in JAX / Flax NNX."""

from llada_jax.config import LLaDAConfig
from llada_jax.model import LLaDAForMaskedLM
from llada_jax.sampling import create_sampler, generate

__version__ = "0.1.0"
__all__ = ["LLaDAConfig", "LLaDAForMaskedLM", "create_sampler", "generate", "__version__"]
