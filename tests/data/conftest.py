"""Data tests: iterators a test leaves open are closed after it (helpers live in datahelpers.py)."""

import pytest


@pytest.fixture(autouse=True)
def close_iterators_after_each_test():
    """Stop the background threads a test's iterators leave running. tensorflow_datasets imports under
    etils' lazy-import context, which swaps the global import hook: a thread importing a module inside that
    window gets a LazyModule instead (the TFDS test also collects garbage first, for the same reason)."""
    yield
    from llada_jax.data.pipeline import close_open_iterators

    close_open_iterators()
