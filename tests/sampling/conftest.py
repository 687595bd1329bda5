"""Fixtures of the sampling command tests: a tiny saved model with a tiny tokenizer."""

import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.checkpoints.orbax_model import save_model
from llada_jax.data.bpe import build_bpe_tokenizer
from llada_jax.tokenizer import config_overrides

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Lily can run 12 kilometers per hour for 4 hours.",
    "A masked diffusion model predicts every masked token at once.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello there, how are you today? I am fine, thank you.",
] * 4


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("cli")
    tok_dir = str(base / "tok")
    helper = build_bpe_tokenizer(TEXTS, tok_dir, vocab_size=320)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)  # checks below go through transformers directly
    config = LLaDAConfig.tiny(**config_overrides(helper), max_sequence_length=96)
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(1))
    run = save_model(model, str(base / "run"), tokenizer_dir=tok_dir)
    return run, model, tokenizer, base
