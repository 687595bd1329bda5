"""Random-access record sources for Grain: JSONL files (line-offset index) and TFDS array_record datasets.

`open_source(data_path)` picks one from a data path:

- `tfds:NAME[/CONFIG]:SPLIT` -> `TfdsSource` (`tfds.data_source`, array_record files, nothing downloaded);
- otherwise a JSONL file, a glob, a directory (its `*.jsonl` files), or several of these separated by commas
  -> `JsonlSource`. Each may be a local path or a URL (`gs://bucket/...`, anything `etils.epath` / fsspec
  open); a comma list may mix both. On an object store a "directory" is a name prefix: `gs://b/data` means
  the `gs://b/data/*.jsonl` objects.

`JsonlSource` finds every non-blank line of every file in one streaming pass (newline positions found with
numpy, 4 MiB at a time; a URL is streamed once through `storage.open_file`), keeps the byte ranges and
physical line numbers in an index, and reads record `i` with one positioned read of exactly its byte range:
`os.pread` on a local file, a ranged GET (fsspec `cat_file(path, start, end)`, no read-ahead: records are
read in shuffled order) on a URL. On GCS that read names the object generation that was indexed, so an
object replaced (or deleted) during a run is an error at the first read, never records cut from the new
content at the old offsets.

The index is cached locally under `index_cache_dir` (also for URLs: nothing is written next to the data) and
memory-mapped from there, so many worker processes share one copy. The cache key is the file's absolute
path, size and modification time, or for a URL the URL, the object's size and its version (the GCS
generation, else the etag, as `storage.info` reports it, asked for afresh), so an edited file or a replaced
object is indexed again; an object store that reports no version gets no cache. The indexes of several URLs
are loaded (or built) by a few threads at once: each is a round trip, or a network stream.

The source pickles without open files or (when cached) the index itself; files are opened lazily, once per
process. Reads are thread-safe (Grain reads from several threads): `os.pread` takes its offset and moves no
shared file position, and a URL read is one self-contained request (nothing is shared between threads but
fsspec's file system, whose requests run on its own event loop). Both sources return `RawRecord`s, which
carry where the record came from so that every error can name the file and line.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from llada_jax.checkpoints import storage
from llada_jax.checkpoints.storage import StorageError
from llada_jax.errors import DataError

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_CHUNK = 4 << 20
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
TFDS_PREFIX = "tfds:"
_INDEX_THREADS = 16  # URLs whose indexes are loaded (or built) at once


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

    Each item may be a local path or a URL (see the module docstring). The result is sorted within each item
    (globs, directories) and keeps the items' order; a name that matches nothing is a `FileNotFoundError`
    naming it (for a URL in a bucket that does not exist, or cannot be read, the message says so); other
    storage errors (no permission to list) are `StorageError`s naming the URL.
    """
    items = data_path.split(",") if isinstance(data_path, str) else list(data_path)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ValueError("no data path given")
    files: list[str] = []
    for item in items:
        files.extend(_resolve_url(item) if storage.is_url(item) else _resolve_local(item))
    return files


def _resolve_local(item: str) -> list[str]:
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
    return found


def _resolve_url(item: str) -> list[str]:
    """An object, a glob over objects, or a prefix holding *.jsonl objects."""
    try:
        if _has_magic(item):
            found = _glob_objects(item)
            if not found:
                raise FileNotFoundError(f"{item}: no object matches this pattern")
            return found
        if storage.is_file(item):
            return [item]
        if storage.is_dir(item):
            found = _glob_objects(storage.join(item, "*.jsonl"))
            if not found:
                raise FileNotFoundError(f"{item}: directory (prefix) holds no *.jsonl objects")
            return found
        raise FileNotFoundError(f"{item}: no such object")
    except FileNotFoundError as e:
        raise FileNotFoundError(_missing_bucket_message(item) or str(e)) from None
    except StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):  # listing a bucket that does not exist
            raise FileNotFoundError(_missing_bucket_message(item) or str(e)) from None
        raise


def _missing_bucket_message(url: str) -> str | None:
    """The error for `url` when its bucket does not exist (or cannot be read); None when the bucket is there."""
    scheme, _, rest = url.partition("://")
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    try:
        if storage.exists(bucket):
            return None
    except StorageError:
        pass
    return f"{url}: no such bucket {bucket} (or no permission to read it)"


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _glob_objects(pattern: str) -> list[str]:
    """The objects (not prefixes) whose URLs match `pattern`, sorted: one listing, no request per match."""
    import fsspec

    with storage.errors_named(pattern):
        fs, _ = fsspec.core.url_to_fs(pattern)
        fs.invalidate_cache()  # list what is there now, never a listing cached earlier in the process
        found = fs.glob(pattern, detail=True)
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{name}" for name, meta in found.items() if meta.get("type", "file") == "file")


# ----------------------------------------------------------------------------------------------------
# The line index
# ----------------------------------------------------------------------------------------------------

def build_line_index(path: str) -> np.ndarray:
    """int64 [n, 3]: (start byte, end byte, 1-based line number) of each non-blank line of `path`.

    `end` excludes the newline (a carriage return before it stays: JSON ignores it). A last line without
    a newline counts; lines holding only whitespace are blank. One streaming pass, vectorised per chunk;
    a URL is streamed once (`storage.open_file`).
    """
    rows: list[np.ndarray] = []
    line_start = 0  # file offset where the current (unfinished) line starts
    line_has_content = False
    line_no = 1
    pos = 0
    with storage.open_file(path, "rb") as f:
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


def _stamp(path: str) -> tuple[str, int, str] | None:
    """(name, size, version) of `path` for the cache key: the absolute path and modification time of a local
    file; for a URL the URL and the object's version (generation or etag: `storage.info` asks afresh).
    None for an object store that gives no version (then the index is not cached: the size alone could miss
    a replaced object)."""
    if not storage.is_url(path):
        st = os.stat(path)
        return os.path.abspath(path), st.st_size, str(st.st_mtime_ns)
    meta = storage.info(path)
    if meta["version"] in ("", "None"):
        return None
    return storage.clean(path), int(meta["size"]), meta["version"]


def _cache_file(stamp: tuple[str, int, str], cache_dir: str) -> str:
    name, size, version = stamp
    key = f"{name}\0{size}\0{version}\0v{INDEX_VERSION}"
    return os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:32] + ".npy")


def load_line_index(path: str, cache_dir: str | None) -> tuple[np.ndarray, str | None]:
    """The index of `path` from the cache (memory-mapped) or built now and cached. Returns (index, cache file)."""
    index, cached, _ = _load_line_index(path, cache_dir)
    return index, cached


def _load_line_index(path: str, cache_dir: str | None):
    """`load_line_index`, and the stamp (name, size, version) of the file the index describes (None when
    that is not known: a file that changed while it was read, or a local file without a cache)."""
    stamp_before = _stamp(path) if cache_dir or storage.is_url(path) else None
    if cache_dir and stamp_before is not None:
        cached = _cache_file(stamp_before, cache_dir)
        if os.path.exists(cached):
            try:
                return np.load(cached, mmap_mode="r"), cached, stamp_before
            except (OSError, ValueError) as e:  # a damaged cache entry is rebuilt
                log.warning("rebuilding damaged index cache %s: %s", cached, e)
    index = build_line_index(path)
    if stamp_before is None or _stamp(path) != stamp_before:
        return index, None, None  # changed while it was read: not cached under any key
    if cache_dir:  # the key is the size and version before, the same after
        try:
            _atomic_save_npy(cached, index)
            return np.load(cached, mmap_mode="r"), cached, stamp_before
        except OSError as e:
            log.warning("cannot cache the index of %s in %s: %s", path, cache_dir, e)
    return index, None, stamp_before


def _load_line_indexes(paths: list[str], cache_dir: str | None) -> list:
    """`_load_line_index` of each path, in order. Several URLs are done by a few threads at once (each is a
    round trip for the version, and a network stream when built); local files one after the other. The
    first error, in the order of `paths`, is raised."""
    if sum(storage.is_url(p) for p in paths) < 2:
        return [_load_line_index(p, cache_dir) for p in paths]
    pool = ThreadPoolExecutor(min(_INDEX_THREADS, len(paths)), thread_name_prefix="jsonl-index")
    try:
        futures = [pool.submit(_load_line_index, p, cache_dir) for p in paths]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    """Random access to the records (non-blank lines) of one or more JSONL files (local paths or URLs).

    `skip_empty_files`: a file without records is an error by default; with True it is left out and listed
    in `empty_files` (the pipeline reports it).
    """

    def __init__(self, data_path, *, index_cache_dir: str | None = "default", skip_empty_files: bool = False):
        if index_cache_dir == "default":
            index_cache_dir = default_index_cache_dir()
        self.paths: list[str] = []
        self.empty_files: list[str] = []
        indexes, cache_files = [], []
        paths = resolve_paths(data_path)
        versions = []
        for path, (index, cached, stamp) in zip(paths, _load_line_indexes(paths, index_cache_dir)):
            if len(index) == 0:
                if not skip_empty_files:
                    raise DataError(path, "", "the file holds no records (it is empty or blank)")
                self.empty_files.append(path)  # the caller reports them (open_data_source logs each)
                continue
            self.paths.append(path)
            indexes.append(index)
            cache_files.append(cached)
            versions.append(stamp[2] if stamp is not None and storage.is_url(path) else None)
        if not self.paths:
            raise DataError(str(data_path), "", "no records in any file")
        self._indexes = indexes
        self._cache_files = cache_files
        self._cum = np.cumsum([len(ix) for ix in indexes]).tolist()
        self._versions = versions  # of the URLs: the object generation (or etag) their index describes
        self._remote = [storage.is_url(p) for p in self.paths]
        self._fds: dict[int, int] = {}
        self._targets: dict[int, tuple] = {}
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
        if self._remote[k]:
            data = self._read_remote(k, start, end, line)
        else:
            data = os.pread(self._fd(k), end - start, start)
        if len(data) != end - start:
            raise DataError(f"{self.paths[k]}, line {line}", "",
                            "the file changed after it was indexed (short read); index it again")
        return RawRecord(data, self.paths[k], line)

    def _fd(self, k: int) -> int:
        """The descriptor of local file `k`, opened on first use in this process (`os.pread` on it is
        thread-safe: it takes the offset and moves no shared position)."""
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent, open our own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(k)
        if fd is None:
            if len(self._fds) >= 256:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[k] = os.open(self.paths[k], os.O_RDONLY)
        return fd

    def _target(self, k: int) -> tuple:
        """(file system, path in it, read options) of URL `k`, for this process (fsspec makes a process its
        own file-system instance and event loop). On GCS the read names the generation that was indexed."""
        if self._pid != os.getpid():
            self._fds, self._targets, self._pid = {}, {}, os.getpid()
        target = self._targets.get(k)
        if target is None:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(self.paths[k])
            version = self._versions[k]
            pin = {"generation": version} if "gs" in fs.protocol and version and version.isdigit() else {}
            target = self._targets[k] = (fs, inner, pin)
        return target

    def _read_remote(self, k: int, start: int, end: int, line: int) -> bytes:
        """Bytes [start, end) of URL `k`: one ranged GET (`cat_file`), which keeps no position or buffer, so
        any number of threads may read at once. A range past the end of the object reads as short; a
        generation that is gone (the object was replaced or deleted) is a `DataError` like a short read;
        other failures are `StorageError`s naming the URL and line."""
        fs, inner, pin = self._target(k)
        where = f"{self.paths[k]}, line {line}"
        try:
            with storage.errors_named(self.paths[k]):
                return fs.cat_file(inner, start=start, end=end, **pin)
        except StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                raise DataError(where, "", "the object was replaced or deleted after it was indexed; index it "
                                           "again") from None
            raise
        except Exception as e:  # noqa: BLE001 - fsspec back ends raise their own HTTP error types
            if getattr(e, "code", None) == 416:  # range not satisfiable: the object is shorter now
                return b""
            raise StorageError(f"{where}: cannot read the record: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Close this process's local descriptors (URLs hold none)."""
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
        state["_fds"], state["_targets"] = {}, {}
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
    read as one JSON array (Alpaca and ShareGPT dumps) and yields its items ("item N", from 0). `path` may be
    a URL (streamed through `storage.open_file`). A missing file, or a file with no records, raises
    `DataError`; a storage failure (no permission, a lost connection) a `StorageError` naming the URL.
    """
    import json

    if not storage.is_file(path):
        raise DataError(path, "", "no such object (or no such bucket)" if storage.is_url(path) else "no such file")
    with storage.open_file(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head:
            more = f.read(1 << 20)
            if not more:
                break
            head = more.lstrip()
    n = 0
    if head.startswith(b"["):
        with storage.open_file(path, "rb") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {e.lineno}", "", f"malformed JSON: {e.msg} (column {e.colno})") from None
            except UnicodeDecodeError as e:
                raise DataError(path, "", f"not UTF-8 text: {e.reason} at byte {e.start}") from None
        for n, item in enumerate(items, 1):
            yield RawRecord(item, path, n - 1, "item")
    else:
        with storage.open_file(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    n += 1
                    yield RawRecord(line, path, line_no)
    if n == 0:
        raise DataError(path, "", "the file holds no records (it is empty or blank)")
