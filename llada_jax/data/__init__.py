"""Training data: sources, record formats, tokenizers, the Grain pipeline, converters and checks.

    sources.py     random-access JSONL (cached line index) and TFDS array_record sources
    formats.py     records -> validated tokens (pretraining documents, SFT examples, chats)
    batching.py    concat / pad / sft rows and batches with an exact, small iterator state
    settings.py    check_config (the data settings of a run config), mark_absl_flags_parsed
    pipeline.py    make_train_iterator, global_batch, pipeline_stats, close_open_iterators
    converters.py  DatasetConverter (ShareGPT, Alpaca, OpenAI -> pre-tokenized SFT JSONL)
    check.py       check_files (`llada-jax data check`)
    skips.py       skip events and reports (bad records raise llada_jax.errors.DataError)
    bpe.py         build_bpe_tokenizer: an offline byte-level BPE tokenizer with the LLaDA special tokens
    cli.py         `llada-jax data convert` / `llada-jax data check`

Importing this package is light; the names below load their module on first use.
"""

import importlib

_EXPORTS = {
    "build_bpe_tokenizer": "bpe",
    "JsonlSource": "sources", "TfdsSource": "sources", "open_source": "sources",
    "PretrainFormat": "formats", "SftFormat": "formats",
    "make_train_iterator": "pipeline", "make_dataset": "pipeline", "global_batch": "pipeline",
    "pipeline_stats": "pipeline", "close_open_iterators": "pipeline",
    "check_config": "settings", "mark_absl_flags_parsed": "settings",
    "DatasetConverter": "converters",
    "check_files": "check",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llada_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llada_jax.data' has no attribute {name!r}")
