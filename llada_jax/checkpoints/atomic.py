"""Writing files and directories so that a reader never sees a half-written one.

Everything is written under a temporary name in the destination's own directory (so the final rename stays
on one file system), flushed, and renamed into place only when complete; on any error, or an interrupt, the
temporary is removed and the destination is untouched. Orbax checkpoints get the same guarantee from Orbax
itself (a step directory is renamed into place when finished, see `layout.is_finished`).

    atomic_file(path, mode)      a file object whose contents become `path` when the block succeeds
    write_json(path, obj)        JSON (sorted keys, numpy scalars as numbers) via atomic_file
    atomic_dir(path, overwrite)  a directory built in a temporary sibling and renamed into place
    copy_dir(src, dst)           an atomic copy of a directory that replaces `dst`

On an object store (a URL, see `storage`) there is no rename, and the guarantees hold differently: a file is
written to a local temporary and uploaded as one object, which readers see only once the upload is complete
(an interrupted upload leaves no object, or the previous one). A directory is built locally and uploaded file
by file, the files named in `last` after the others (`config.json` for a Hugging Face directory, the
tokenizer's files for a tokenizer), so a reader that needs them never takes a partial upload for a complete
directory. Orbax checkpoints need none of this: a step counts only once Orbax has finalised it
(`layout.is_finished`: a rename locally, a `commit_success.txt` marker on object stores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Iterator

from llada_jax.checkpoints import storage


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Yield a file opened on a temporary sibling of `path`; it replaces `path` when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    if storage.is_url(path):
        with tempfile.TemporaryDirectory(prefix="llada_jax_upload_") as tmp:
            local = os.path.join(tmp, "file")
            with open(local, mode, encoding=None if "b" in mode else encoding) as f:
                yield f
            storage.upload(local, path)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(x):
    import numpy as np

    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON with sorted keys (numpy scalars written as numbers), atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool = False, last: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a temporary local directory that becomes `path` when the block succeeds (and vanishes otherwise).

    An existing non-empty `path` is an error unless `overwrite`; then it is replaced only after the new
    directory is complete. For a URL, see the module docstring (`last`: the files uploaded last).
    """
    if storage.is_url(path):
        path = storage.clean(path)
        old = storage.listdir(path)
        if old and not overwrite:
            raise FileExistsError(f"{path}: already exists (pass --overwrite / overwrite=True to replace it)")
        storage.check_writable(path)  # a wrong bucket fails now, not after the directory is built
        with tempfile.TemporaryDirectory(prefix="llada_jax_upload_") as tmp:
            yield tmp
            storage.upload(tmp, path, last=last)
            new = set(os.listdir(tmp))
        for name in old:  # what the new directory does not have any more
            if name not in new:
                storage.remove_tree(storage.join(path, name))
        return
    path = os.path.abspath(path.rstrip("/"))
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)) and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass --overwrite / overwrite=True to replace it)")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.partial-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def copy_dir(src: str, dst: str, *, last: tuple[str, ...] = ()) -> None:
    """Copy the directory `src` to `dst` (either may be a URL), replacing `dst` only once the copy is complete."""
    if storage.clean(src) == storage.clean(dst):
        return
    with atomic_dir(dst, overwrite=True, last=last) as tmp:
        shutil.copytree(storage.local_copy(src), tmp, dirs_exist_ok=True)
