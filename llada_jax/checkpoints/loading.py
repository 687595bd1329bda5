"""Loading a model whatever its format: an Orbax run or a Hugging Face directory (auto-detected).

    load_model_and_tokenizer(path)   the model and the tokenizer stored with it: what sampling, evaluation,
                                     the lm-eval adapter and the demo load
    load_pretrained(path)            the model alone (`LLaDAForMaskedLM.from_pretrained`)
    read_model_config(path)          its LLaDAConfig, without the weights
"""

from __future__ import annotations

from llada_jax.checkpoints import layout, storage
from llada_jax.config import LLaDAConfig


def load_pretrained(path: str, dtype: str | None = None, **overrides):
    """Load a model from an Orbax checkpoint (a run directory, its checkpoints/ directory, or a step) or a
    Hugging Face directory (one with config.json), detected automatically.

    `dtype` sets the compute dtype; keyword arguments: `param_dtype` (default: as stored), `mesh` and `rules`
    (shard the parameters as they are placed), and LLaDAConfig fields that do not change shapes
    (scan_layers, remat_policy, attention_impl).
    """
    if layout.model_format(path) == "hf":
        from llada_jax.checkpoints.hf_import import load_hf_model

        return load_hf_model(path, dtype, **overrides)
    from llada_jax.checkpoints.orbax_model import load_model

    return load_model(path, dtype=dtype, **overrides)


def load_model_and_tokenizer(path: str, *, dtype: str | None = None, tokenizer: str | None = None, **overrides):
    """(model, TokenizerHelper or None): a saved model and the tokenizer stored with it (or the one at
    `tokenizer`). `dtype` sets both the compute and the parameter dtype (default: as stored); other keyword
    arguments as `load_pretrained` (mesh, rules, scan_layers, ...)."""
    from llada_jax.tokenizer import TokenizerHelper

    if dtype is not None:
        overrides = {"param_dtype": dtype, **overrides}
    model = load_pretrained(path, dtype, **overrides)
    directory = tokenizer or layout.tokenizer_path(path)
    return model, TokenizerHelper(storage.local_copy(directory)) if directory else None


def read_model_config(path: str) -> LLaDAConfig:
    """The LLaDAConfig (architecture) of a saved model, Orbax or Hugging Face, without loading its weights."""
    if layout.model_format(path) == "hf":
        from llada_jax.checkpoints.hf_config import from_hf_config, read_hf_config

        return from_hf_config(read_hf_config(path), source=storage.join(path, layout.HF_CONFIG_FILE))
    from llada_jax.checkpoints.orbax_model import read_model_config as read_orbax_config

    return read_orbax_config(path)

