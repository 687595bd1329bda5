"""Shared fixtures of the data tests: a tiny tokenizer built offline (helpers live in datahelpers.py)."""

import pytest

CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "Diffusion language models predict masked tokens in parallel.",
    "A quick brown fox jumps over the lazy dog.",
    "Hello world! Hello again, world.",
    "Large language diffusion models are trained from scratch.",
] * 20


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from llada_jax.data.bpe import build_bpe_tokenizer

    out = str(tmp_path_factory.mktemp("tok") / "tiny_tokenizer")
    build_bpe_tokenizer(CORPUS, out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def helper(tokenizer_dir):
    from llada_jax.tokenizer import TokenizerHelper

    return TokenizerHelper(tokenizer_dir)


@pytest.fixture(autouse=True)
def close_iterators_after_each_test():
    """Stop the background threads a test's iterators leave running. tensorflow_datasets imports under
    etils' lazy-import context, which swaps the global import hook: a thread importing a module inside that
    window gets a LazyModule instead (the TFDS test also collects garbage first, for the same reason)."""
    yield
    from llada_jax.data.pipeline import close_open_iterators

    close_open_iterators()
