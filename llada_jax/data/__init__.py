"""Training data: sources, record formats, tokenizers, the Grain pipeline, converters and checks.

    sources.py     random-access JSONL (cached line index) and TFDS array_record sources
    formats.py     records -> validated tokens (pretraining documents, SFT examples, chats)
    tokenizer.py   TokenizerHelper, the LLaDA chat template, an offline BPE tokenizer builder
    batching.py    concat / pad / sft rows and batches with an exact, small iterator state
    pipeline.py    make_train_iterator, global_batch, pipeline_stats
    converters.py  DatasetConverter (ShareGPT, Alpaca, OpenAI -> pre-tokenized SFT JSONL)
    check.py       check_files (`llada-jax data check`)
    errors.py      DataError (names file, line and field) and skip reports
    cli.py         `llada-jax data convert` / `llada-jax data check`

Importing this package is light; the names below load their module on first use.
"""

import importlib

_EXPORTS = {
    "DataError": "errors",
    "JsonlSource": "sources", "TfdsSource": "sources", "open_source": "sources",
    "PretrainFormat": "formats", "SftFormat": "formats",
    "TokenizerHelper": "tokenizer", "build_bpe_tokenizer": "tokenizer", "config_overrides": "tokenizer",
    "check_compatible": "tokenizer", "LLADA_CHAT_TEMPLATE": "tokenizer",
    "make_train_iterator": "pipeline", "make_dataset": "pipeline", "global_batch": "pipeline",
    "pipeline_stats": "pipeline",
    "DatasetConverter": "converters",
    "check_files": "check",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llada_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llada_jax.data' has no attribute {name!r}")
