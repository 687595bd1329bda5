"""Streaming reads and writes of (sharded) safetensors files, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its dtype,
shape and [begin, end) byte offsets into the data section, then the data. The `safetensors` package reads
through a memory map (every page touched stays resident in this process while the file is open) and writes
only whole state dicts, so conversion uses this small reader and writer instead: a tensor is read with one
`readinto` into its own array, and a shard is laid out from the list of tensors first and then filled at the
planned offsets in any order. Files written here are checked against the `safetensors` package in the tests.

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


class SafetensorsError(ValueError):
    """A malformed or inconsistent safetensors file or index."""


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
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def read_header(path: str) -> tuple[dict, int]:
    """(header without __metadata__, absolute offset of the data section) of one safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: not a safetensors file (header length {n} is invalid)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: not a safetensors file (unreadable header: {e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: malformed header entry for {name!r}") from e
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} has inconsistent offsets {begin}..{end} "
                                   f"for shape {list(shape)} {dtype} (file size {size})")
    return header, data_start


class TensorReader:
    """The tensors of a model directory (one `model.safetensors` or a sharded index), read one at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(index_path):
            self.files = self._files_from_index(index_path)
        elif os.path.exists(single_path):
            self.files, self._weight_map = [SINGLE_FILE], None
        else:
            others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".safetensors")))
            hint = f" (found {', '.join(others)}; only safetensors weights are supported)" if others else ""
            raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            path = os.path.join(directory, file)
            header, data_start = read_header(path)
            for name, entry in header.items():
                if self._weight_map is not None and self._weight_map.get(name) != file:
                    listed = self._weight_map.get(name)
                    raise SafetensorsError(
                        f"{path}: holds tensor {name!r}, which {INDEX_FILE} "
                        + (f"places in {listed}" if listed else "does not list"))
                if name in self.tensors:
                    raise SafetensorsError(f"{path}: tensor {name!r} is also in {self.tensors[name].path}")
                begin, end = entry["data_offsets"]
                self.tensors[name] = TensorInfo(name, path, entry["dtype"], tuple(entry["shape"]),
                                                data_start + begin, end - begin)
        if self._weight_map is not None:
            absent = sorted(set(self._weight_map) - set(self.tensors))
            if absent:
                raise SafetensorsError(f"{index_path}: lists tensors that are in no shard: {_short(absent)}")

    def _files_from_index(self, index_path: str) -> list[str]:
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index_path}: not a safetensors index (needs a 'weight_map' object)") from e
        files = sorted(set(weight_map.values()))
        for file in files:
            if not os.path.exists(os.path.join(self.directory, file)):
                raise FileNotFoundError(f"{index_path}: lists shard {file}, which does not exist")
        self._weight_map = weight_map
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array (nothing else of the file is kept in memory)."""
        info = self.tensors[name]
        out = np.empty(info.shape, info.np_dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            got = 0
            while got < info.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise SafetensorsError(f"{info.path}: truncated while reading tensor {name!r}")
                got += n
        return out


def _short(items: Sequence[str], n: int = 5) -> str:
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

    def write(self, name: str, array: np.ndarray) -> None:
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in the planned layout")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was already written")
        dtype, shape = self._entries[name]
        if tuple(array.shape) != shape or np.dtype(array.dtype) != DTYPES[dtype]:
            raise ValueError(f"tensor {name!r}: expected {list(shape)} {dtype}, got {list(array.shape)} "
                             f"{array.dtype}")
        shard = self._where[name]
        begin, nbytes = shard.offsets[name]
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        fd, pos, done = self._fds[shard.file], len(shard.header) + begin, 0
        while done < nbytes:
            done += os.pwrite(fd, data[done:], pos + done)
        self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self._entries if n not in self._written]
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if missing:
            raise ValueError(f"tensors never written: {_short(missing)}")
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
