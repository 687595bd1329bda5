"""Random-access record sources for Grain: JSONL files (line-offset index) and TFDS array_record datasets.

`open_source(data_path)` picks one from a data path:

- `tfds:NAME[/CONFIG]:SPLIT` -> `TfdsSource` (`tfds.data_source`, array_record files, nothing downloaded);
- otherwise a JSONL file, a glob, a directory (its `*.jsonl` files), or several of these separated by commas
  -> `JsonlSource`.

`JsonlSource` finds every non-blank line of every file in one streaming pass (newline positions found with
numpy, 4 MiB at a time), keeps the byte ranges and physical line numbers in an index, and reads record `i`
with one positioned read (`os.pread`). The index is cached under `index_cache_dir` keyed by the file's
absolute path, size and modification time (an edited file is indexed again) and memory-mapped from there, so
many worker processes share one copy. The source pickles without open files or (when cached) the index
itself; files are opened lazily, once per process. Both sources return `RawRecord`s, which carry where the
record came from so that every error can name the file and line.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import logging
import os
import tempfile
from typing import NamedTuple

import numpy as np

from llada_jax.errors import DataError

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_CHUNK = 4 << 20
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
TFDS_PREFIX = "tfds:"


class RawRecord(NamedTuple):
    """One record as stored: JSON bytes (JSONL) or a decoded feature dict (TFDS), and where it came from."""

    data: bytes | dict
    path: str
    position: int  # 1-based line number (JSONL) or 0-based record index (TFDS)
    unit: str = "line"

    @property
    def where(self) -> str:
        return f"{self.path}, {self.unit} {self.position}"


def default_index_cache_dir() -> str:
    base = os.environ.get("LLADA_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llada_jax")
    return os.path.join(base, "jsonl_index")


# ----------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------

def resolve_paths(data_path: str | list[str] | tuple[str, ...]) -> list[str]:
    """JSONL files named by `data_path`: files, globs, directories (their *.jsonl), comma-separated or a list.

    The result is sorted within each item (globs, directories) and keeps the items' order; a name that
    matches nothing is an error.
    """
    items = data_path.split(",") if isinstance(data_path, str) else list(data_path)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ValueError("no data path given")
    files: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.jsonl")))
            if not found:
                raise FileNotFoundError(f"{item}: directory holds no *.jsonl files")
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"{item}: no such file (or no file matches this pattern)")
        files.extend(found)
    return files


# ----------------------------------------------------------------------------------------------------
# The line index
# ----------------------------------------------------------------------------------------------------

def build_line_index(path: str) -> np.ndarray:
    """int64 [n, 3]: (start byte, end byte, 1-based line number) of each non-blank line of `path`.

    `end` excludes the newline (a carriage return before it stays: JSON ignores it). A last line without
    a newline counts; lines holding only whitespace are blank. One streaming pass, vectorised per chunk.
    """
    rows: list[np.ndarray] = []
    line_start = 0  # file offset where the current (unfinished) line starts
    line_has_content = False
    line_no = 1
    pos = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            arr = np.frombuffer(chunk, dtype=np.uint8)
            newlines = np.flatnonzero(arr == 10)
            content = np.concatenate([[0], np.cumsum(~_WHITESPACE[arr], dtype=np.int32)])
            seg_starts = np.concatenate([[0], newlines + 1])
            seg_ends = np.concatenate([newlines, [len(arr)]])
            has = content[seg_ends] > content[seg_starts]
            has[0] |= line_has_content
            starts = pos + seg_starts
            starts[0] = line_start
            n_complete = len(newlines)
            if n_complete:
                keep = np.flatnonzero(has[:n_complete])
                rows.append(np.stack([starts[keep], pos + seg_ends[keep], line_no + keep], axis=1))
            line_no += n_complete
            line_start, line_has_content = int(starts[-1]), bool(has[-1])
            pos += len(arr)
    if line_has_content:
        rows.append(np.array([[line_start, pos, line_no]], dtype=np.int64))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)


def _cache_file(path: str, cache_dir: str) -> tuple[str, os.stat_result]:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0v{INDEX_VERSION}"
    name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".npy"
    return os.path.join(cache_dir, name), st


def load_line_index(path: str, cache_dir: str | None) -> tuple[np.ndarray, str | None]:
    """The index of `path` from the cache (memory-mapped) or built now and cached. Returns (index, cache file)."""
    if cache_dir:
        cached, st_before = _cache_file(path, cache_dir)
        if os.path.exists(cached):
            try:
                return np.load(cached, mmap_mode="r"), cached
            except (OSError, ValueError) as e:  # a damaged cache entry is rebuilt
                log.warning("rebuilding damaged index cache %s: %s", cached, e)
    index = build_line_index(path)
    if cache_dir:
        st_after = os.stat(path)
        # cached only if the file did not change while it was read (the key is its size and mtime before)
        if (st_after.st_size, st_after.st_mtime_ns) == (st_before.st_size, st_before.st_mtime_ns):
            try:
                _atomic_save_npy(cached, index)
                return np.load(cached, mmap_mode="r"), cached
            except OSError as e:
                log.warning("cannot cache the index of %s in %s: %s", path, cache_dir, e)
    return index, None


def _atomic_save_npy(target: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------

class JsonlSource:
    """Random access to the records (non-blank lines) of one or more JSONL files.

    `skip_empty_files`: a file without records is an error by default; with True it is left out and listed
    in `empty_files` (the pipeline reports it).
    """

    def __init__(self, data_path, *, index_cache_dir: str | None = "default", skip_empty_files: bool = False):
        if index_cache_dir == "default":
            index_cache_dir = default_index_cache_dir()
        self.paths: list[str] = []
        self.empty_files: list[str] = []
        indexes, cache_files = [], []
        for path in resolve_paths(data_path):
            index, cached = load_line_index(path, index_cache_dir)
            if len(index) == 0:
                if not skip_empty_files:
                    raise DataError(path, "", "the file holds no records (it is empty or blank)")
                self.empty_files.append(path)  # the caller reports them (open_data_source logs each)
                continue
            self.paths.append(path)
            indexes.append(index)
            cache_files.append(cached)
        if not self.paths:
            raise DataError(str(data_path), "", "no records in any file")
        self._indexes = indexes
        self._cache_files = cache_files
        self._cum = np.cumsum([len(ix) for ix in indexes]).tolist()
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._cum[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(file number, record number within that file) of global record `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} is out of range [0, {len(self)})")
        k = bisect.bisect_right(self._cum, i)
        return k, i - (self._cum[k - 1] if k else 0)

    def __getitem__(self, i: int) -> RawRecord:
        i = int(i)
        k, j = self.locate(i)
        start, end, line = (int(v) for v in self._indexes[k][j])
        data = os.pread(self._fd(k), end - start, start)
        if len(data) != end - start:
            raise DataError(f"{self.paths[k]}, line {line}", "",
                            "the file changed after it was indexed (short read); index it again")
        return RawRecord(data, self.paths[k], line)

    def _fd(self, k: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent, open our own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(k)
        if fd is None:
            if len(self._fds) >= 256:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[k] = os.open(self.paths[k], os.O_RDONLY)
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        # A cached index travels as its file name and is memory-mapped again on arrival.
        state["_indexes"] = [None if cached else ix for ix, cached in zip(self._indexes, self._cache_files)]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()
        self._indexes = [ix if ix is not None else np.load(cached, mmap_mode="r")
                         for ix, cached in zip(self._indexes, self._cache_files)]

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} file(s), {len(self)} records)"


def parse_tfds_path(data_path: str) -> tuple[str, str]:
    """`tfds:NAME[/CONFIG]:SPLIT` -> (NAME[/CONFIG], SPLIT). A dataset name has no colon; a split may (TFDS
    slicing: `train[:90%]`)."""
    body = data_path[len(TFDS_PREFIX):]
    name, sep, split = body.partition(":")
    if not sep or not name or not split:
        raise ValueError(f"{data_path!r}: a TFDS data path looks like tfds:NAME[/CONFIG]:SPLIT")
    return name, split


class TfdsSource:
    """Random access to a prepared TFDS dataset in array_record format (`tfds.data_source`); nothing downloads.

    Pickles as (name, split, data_dir) and reopens the dataset in the receiving process, which needs no
    builder class: TFDS reads a prepared dataset from its files.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.label = f"tfds:{name}:{split}"
        self._open()

    def _open(self) -> None:
        import tensorflow_datasets as tfds

        try:
            self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
        except Exception as e:  # noqa: BLE001 - tfds raises many types for a missing or unprepared dataset
            raise FileNotFoundError(
                f"{self.label}: cannot open the prepared dataset (data_dir={self.data_dir!r}): {e}") from e

    def __getstate__(self):
        return {"name": self.name, "split": self.split, "data_dir": self.data_dir, "label": self.label}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> RawRecord:
        return RawRecord(self._source[int(i)], self.label, int(i), "record")

    def __repr__(self) -> str:
        return f"TfdsSource({self.label}, {len(self)} records)"


def open_source(data_path: str, *, tfds_data_dir: str | None = None, index_cache_dir: str | None = "default",
                skip_empty_files: bool = False):
    """A `TfdsSource` for `tfds:NAME[/CONFIG]:SPLIT`, otherwise a `JsonlSource`."""
    if isinstance(data_path, str) and data_path.startswith(TFDS_PREFIX):
        name, split = parse_tfds_path(data_path)
        return TfdsSource(name, split, data_dir=tfds_data_dir)
    return JsonlSource(data_path, index_cache_dir=index_cache_dir, skip_empty_files=skip_empty_files)


def iter_records(path: str):
    """The records of one file in order, read sequentially (no index): `data convert` and `data check`.

    A JSONL file yields its non-blank lines ("line N"); a file whose first non-blank character is `[` is
    read as one JSON array (Alpaca and ShareGPT dumps) and yields its items ("item N", from 0). A file with
    no records raises `DataError`.
    """
    import json

    if not os.path.isfile(path):
        raise DataError(path, "", "no such file")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head:
            more = f.read(1 << 20)
            if not more:
                break
            head = more.lstrip()
    n = 0
    if head.startswith(b"["):
        with open(path, "rb") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {e.lineno}", "", f"malformed JSON: {e.msg} (column {e.colno})") from None
            except UnicodeDecodeError as e:
                raise DataError(path, "", f"not UTF-8 text: {e.reason} at byte {e.start}") from None
        for n, item in enumerate(items, 1):
            yield RawRecord(item, path, n - 1, "item")
    else:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    n += 1
                    yield RawRecord(line, path, line_no)
    if n == 0:
        raise DataError(path, "", "the file holds no records (it is empty or blank)")
