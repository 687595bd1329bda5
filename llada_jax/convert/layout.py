"""The files of a Hugging Face model directory, and writing an output directory atomically.

An output (HF directory or Orbax run directory) is built in a hidden sibling directory and renamed into
place only when it is complete, so a failed or interrupted conversion leaves nothing at the output path.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from typing import Iterator

HF_FILES_DIR = os.path.join(os.path.dirname(__file__), "hf_files")
MODELING_FILES = ("configuration_llada.py", "modeling_llada.py")

# Files that make up a tokenizer in a Hugging Face model directory.
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "*.tiktoken", "chat_template.jinja",
    "chat_template.json",
)


def is_hf_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def tokenizer_files(directory: str) -> list[str]:
    """Names of the tokenizer files in a directory (an HF model directory or a tokenizer directory)."""
    if not directory or not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory)
                  if os.path.isfile(os.path.join(directory, f))
                  and any(fnmatch.fnmatch(f, pattern) for pattern in TOKENIZER_PATTERNS))


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    files = tokenizer_files(src)
    if files:
        os.makedirs(dst, exist_ok=True)
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return files


def copy_modeling_files(dst: str) -> None:
    """This project's own PyTorch configuration and modeling code, loaded by `trust_remote_code=True`."""
    for f in MODELING_FILES:
        shutil.copy2(os.path.join(HF_FILES_DIR, f), os.path.join(dst, f))


@contextlib.contextmanager
def atomic_output_dir(path: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory that becomes `path` when the block succeeds (and vanishes otherwise).

    An existing non-empty `path` is an error unless `overwrite`; then it is replaced only after the new
    output is complete.
    """
    path = os.path.abspath(path.rstrip("/"))
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)) and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass --overwrite / overwrite=True to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = os.path.join(parent, f".{os.path.basename(path)}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
