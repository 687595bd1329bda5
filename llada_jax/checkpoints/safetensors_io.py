"""Reading and writing (sharded) safetensors files, one tensor at a time.

Reading a local file goes through the `safetensors` package (`safe_open`): it parses and checks the header, and
a tensor is copied out of the memory-mapped file when asked for; the file is opened per tensor, so what the map
touched is released before the next one and host memory holds the tensors being converted plus one. The
package reads only local files: a shard in object storage (a URL) is read with ranged reads instead, its
header first (8 bytes of length, then the JSON) and then each tensor's bytes at its offsets, so nothing is
downloaded that is not converted.

Writing is this module's own `ShardedWriter`: the package writes only whole state dicts (every tensor in
memory at once, in one call), while a conversion must write a model far larger than host memory one tensor
at a time. The writer lays the shards out from the list of (name, dtype, shape) first, creates each file
with its final header and size, and then fills tensors at their planned offsets in any order. Files written
here are read back with the package in the tests.

A sharded checkpoint is `model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {name: file}}), as transformers writes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from llada_jax.checkpoints import storage
from llada_jax.errors import SafetensorsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in DTYPE_NAMES:
        raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors")
    return DTYPE_NAMES[dtype]


def parse_size(size: int | str) -> int:
    """Bytes in a size such as 5GB (10^9), 5GiB (2^30), 500MB or a plain integer."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    value = int(number * scale)
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None = None  # [begin, end) in the data section (read from a URL only)


def _remote_header(url: str) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data section) of a safetensors object, by ranged reads."""
    size = storage.info(url)["size"]
    with storage.open_file(url, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{url}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{url}: not a safetensors file (header length {n} is invalid)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{url}: not a safetensors file (unreadable header: {e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{url}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{url}: malformed header entry for {name!r}") from e
        if dtype not in DTYPES:
            raise SafetensorsError(f"{url}: tensor {name!r} has unsupported dtype {dtype}")
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize or begin < 0 or 8 + n + end > size:
            raise SafetensorsError(f"{url}: tensor {name!r} has inconsistent offsets {begin}..{end} for shape "
                                   f"{list(shape)} {dtype} (object size {size})")
        entry["data_offsets"] = (8 + n + begin, 8 + n + end)  # absolute
    return header, 8 + n


def read_infos(path: str) -> list[TensorInfo]:
    """The tensors of one safetensors file (name, dtype, shape), from its header."""
    if storage.is_url(path):
        infos = [TensorInfo(name, path, entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"]))
                 for name, entry in _remote_header(path)[0].items()]
    else:
        try:
            with safe_open(path, framework="np") as f:
                infos = []
                for name in f.keys():
                    tensor = f.get_slice(name)
                    infos.append(TensorInfo(name, path, tensor.get_dtype(), tuple(tensor.get_shape())))
        except (SafetensorError, OSError) as e:
            raise SafetensorsError(f"{path}: not a safetensors file ({e})") from e
    for info in infos:
        if info.dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {info.name!r} has unsupported dtype {info.dtype}")
    return infos


class TensorReader:
    """The tensors of a model directory (one `model.safetensors` or a sharded index), read one at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = storage.join(directory, INDEX_FILE)
        single_path = storage.join(directory, SINGLE_FILE)
        self._weight_map: dict[str, str] | None = None
        if storage.exists(index_path):
            self.files = self._files_from_index(index_path)
        elif storage.exists(single_path):
            self.files = [SINGLE_FILE]
        else:
            others = [f for f in storage.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".safetensors"))]
            hint = f" (found {', '.join(others)}; only safetensors weights are supported)" if others else ""
            raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            path = storage.join(directory, file)
            for info in read_infos(path):
                if self._weight_map is not None and self._weight_map.get(info.name) != file:
                    listed = self._weight_map.get(info.name)
                    raise SafetensorsError(
                        f"{path}: holds tensor {info.name!r}, which {INDEX_FILE} "
                        + (f"places in {listed}" if listed else "does not list"))
                if info.name in self.tensors:
                    raise SafetensorsError(f"{path}: tensor {info.name!r} is also in {self.tensors[info.name].path}")
                self.tensors[info.name] = info
        if self._weight_map is not None:
            absent = sorted(set(self._weight_map) - set(self.tensors))
            if absent:
                raise SafetensorsError(f"{index_path}: lists tensors that are in no shard: {short_list(absent)}")

    def _files_from_index(self, index_path: str) -> list[str]:
        try:
            weight_map = json.loads(storage.read_text(index_path))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index_path}: not a safetensors index (needs a 'weight_map' object)") from e
        files = sorted(set(weight_map.values()))
        for file in files:
            if not storage.exists(storage.join(self.directory, file)):
                raise FileNotFoundError(f"{index_path}: lists shard {file}, which does not exist")
        self._weight_map = weight_map
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array (the file is closed again: nothing else of it stays in memory)."""
        info = self.tensors[name]
        if info.offsets is not None:  # an object in storage: one ranged read into the array
            begin, end = info.offsets
            out = np.empty(info.shape, DTYPES[info.dtype])
            with storage.open_file(info.path, "rb") as f:
                f.seek(begin)
                data = f.read(end - begin)
            if len(data) != end - begin:
                raise SafetensorsError(f"{info.path}: truncated while reading tensor {name!r}")
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
            return out
        try:
            with safe_open(info.path, framework="np") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise SafetensorsError(f"{info.path}: cannot read tensor {name!r} ({e})") from e


def short_list(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shard:
    file: str
    names: list[str]
    header: bytes = b""
    offsets: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # name -> (abs offset, nbytes)
    size: int = 0


class ShardedWriter:
    """Lays out tensors (name, dtype, shape) over shards of at most `max_shard_size` bytes and writes them.

    Shards are filled in the order given (a tensor larger than the limit gets a shard of its own). Every file
    is created with its final header and size up front; `write(name, array)` puts one tensor at its offset,
    in any order; `close()` checks that every tensor was written and writes the index when there are several
    shards.
    """

    def __init__(self, directory: str, entries: Iterable[tuple[str, str, Sequence[int]]], *,
                 max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None):
        self.directory = directory
        limit = parse_size(max_shard_size)
        self._entries = {name: (dtype, tuple(int(s) for s in shape)) for name, dtype, shape in entries}
        groups: list[list[str]] = []
        current, current_size = [], 0
        for name, (dtype, shape) in self._entries.items():
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            if current and current_size + nbytes > limit:
                groups.append(current)
                current, current_size = [], 0
            current.append(name)
            current_size += nbytes
        if current or not groups:
            groups.append(current)
        n = len(groups)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = [_Shard(file, group) for file, group in zip(names, groups)]
        self._where: dict[str, _Shard] = {}
        self._written: set[str] = set()
        self._rows: dict[str, int] = {}  # rows written so far of tensors written in parts
        self._fds: dict[str, int] = {}
        meta = {"format": "pt", **(metadata or {})}
        for shard in self.shards:
            header, begin = {"__metadata__": meta}, 0
            for name in shard.names:
                dtype, shape = self._entries[name]
                nbytes = math.prod(shape) * DTYPES[dtype].itemsize
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
                shard.offsets[name] = (begin, nbytes)
                begin += nbytes
                self._where[name] = shard
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            shard.header = struct.pack("<Q", len(raw)) + raw
            shard.size = begin
            path = os.path.join(directory, shard.file)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[shard.file] = fd
            os.pwrite(fd, shard.header, 0)
            os.ftruncate(fd, len(shard.header) + shard.size)

    @property
    def total_size(self) -> int:
        return sum(s.size for s in self.shards)

    def write(self, name: str, array: np.ndarray, first_row: int | None = None) -> None:
        """Put a tensor at its offset; with `first_row`, rows first_row .. of a tensor written in parts (a fused
        tensor), which counts as written once all its rows are."""
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in the planned layout")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was already written")
        dtype, shape = self._entries[name]
        rows = shape[0] if first_row is None else array.shape[0]
        start = 0 if first_row is None else first_row
        expected = (rows, *shape[1:])
        if tuple(array.shape) != expected or np.dtype(array.dtype) != DTYPES[dtype] or start + rows > shape[0]:
            raise ValueError(f"tensor {name!r}: expected {list(expected)} {dtype} at row {start} of {shape[0]}, got "
                             f"{list(array.shape)} {array.dtype}")
        shard = self._where[name]
        begin, nbytes = shard.offsets[name]
        row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        fd, pos, done = self._fds[shard.file], len(shard.header) + begin + start * row_bytes, 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], pos + done)
        self._rows[name] = self._rows.get(name, 0) + rows
        if first_row is None or self._rows[name] == shape[0]:
            self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self._entries if n not in self._written]
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if missing:
            raise ValueError(f"tensors never written: {short_list(missing)}")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: shard.file for shard in self.shards for name in shard.names}}
            with open(os.path.join(self.directory, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
