"""Paths that may be local or URLs: `gs://bucket/...` and whatever else `etils.epath` / fsspec handle.

Pod runs keep data, checkpoints and outputs in object storage, which has objects instead of files and
directories: no rename, no append, no in-place writes, and "directories" that exist only as name prefixes.
This module gives the rest of the package one vocabulary over both:

    is_url(path)                 a URL (gs://...) rather than a local path
    epath_of(path)               the `etils.epath.Path` (local paths stay plain)
    exists / is_dir / is_file / listdir / glob / read_text / read_bytes / info
    makedirs(path)               a local directory (object stores need none)
    open_file(path, mode)        read, or write a whole object / file
    local_copy(path)             a local file or directory with the contents of `path` (downloaded once per
                                 process; local paths are returned as they are): for libraries that read only
                                 local files (AutoTokenizer, safetensors)
    upload(local, url, last=())  copy a local file or directory tree to a URL, the names in `last` after the rest

Errors of the storage libraries (a missing object or bucket, a permission error) are re-raised as one line
naming the URL (`StorageError`, an `OSError`; the library's error is its `__cause__`).

Emulators: with the standard `STORAGE_EMULATOR_HOST=http://HOST:PORT` set, `configure_emulator()` (run by the
`llada-jax` command, by this module on import and before the first gs:// file system is made) points every client
at it without credentials: gcsfs and google-cloud-storage read that variable themselves; TensorStore (Orbax's array
I/O) gets `TENSORSTORE_GCS_HTTP_URL` and a test token (`GOOGLE_AUTH_TOKEN_FOR_TESTING`). And gs:// URLs use
gcsfs's flat-namespace file system, without its probe of the bucket type: gcsfs's default class asks the Storage
Control API over gRPC (TLS, to the emulator's host and port) whether a bucket is hierarchical or zonal, which no
emulator answers, and waits out a 60 s retry budget on every file it opens (an unknown type is not cached). gcsfs
picks that class when it is imported, from `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` (set to `false` here), so the
flat class (`gcsfs.core.GCSFileSystem`) is also registered with fsspec for `gs` and `gcs`, which holds when
gcsfs was imported first. A `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=true` already set is kept, with its probe.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from typing import IO, Iterator

from llada_jax.errors import LLaDAError


class StorageError(LLaDAError, OSError):
    """A storage operation on a URL failed (no such bucket or object, no permission, ...): one line naming it."""


def configure_emulator(environ=os.environ) -> None:
    """Point gcsfs and TensorStore at the emulator in STORAGE_EMULATOR_HOST, if one is set (see the module
    docstring). Settings already present are kept."""
    host = environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
    environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    if environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"].lower() not in ("true", "1"):
        _flat_namespace_gcsfs()


def _flat_namespace_gcsfs() -> None:
    """gs:// and gcs:// through gcsfs's flat-namespace file system (no gRPC bucket-type probe), also when gcsfs
    was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set: fsspec's documented registry, the class named
    (imported when first used) or, if fsspec has already loaded one for the protocol, the class itself."""
    import fsspec

    for protocol in ("gs", "gcs"):
        if protocol in fsspec.registry:
            from gcsfs.core import GCSFileSystem

            fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
        else:
            fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)


configure_emulator()


def is_url(path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


@functools.lru_cache(maxsize=None)
def _fresh_listings() -> None:
    """fsspec file systems cache directory listings by default; several processes (and Orbax's own threads)
    write a run's objects, so a cached listing would miss new checkpoint steps. Every gs:// file system lists
    afresh (the listings of one directory are few and small)."""
    import fsspec

    configure_emulator()  # STORAGE_EMULATOR_HOST may have been set after this module was imported
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


def epath_of(path):
    from etils import epath

    if is_url(path):
        _fresh_listings()
    return epath.Path(str(path))


def join(path: str, *parts: str) -> str:
    """`os.path.join` that keeps a URL a URL."""
    if is_url(path):
        return "/".join([str(path).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(path, *parts)


def clean(path: str) -> str:
    """A canonical spelling: local paths absolute, URLs without a trailing slash."""
    return str(path).rstrip("/") if is_url(path) else os.path.abspath(str(path).rstrip("/") or "/")


@contextlib.contextmanager
def errors_named(path):
    """Re-raise the storage libraries' errors about `path` as one line naming it."""
    if not is_url(path):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{path}: no such object (or no such bucket)") from e
    except PermissionError as e:
        raise StorageError(f"{path}: permission denied ({e})") from e
    except OSError as e:
        raise StorageError(f"{path}: {type(e).__name__}: {e}") from e


def exists(path) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with errors_named(path):
        return epath_of(path).exists()


def is_dir(path) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    with errors_named(path):
        return epath_of(path).is_dir()


def is_file(path) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    with errors_named(path):
        return epath_of(path).is_file()


def listdir(path) -> list[str]:
    """Names in a directory (an empty list when there is none)."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    with errors_named(path):
        p = epath_of(path)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def glob(pattern: str) -> list[str]:
    """Paths matching a glob pattern (`*`, `?`, `[...]`; `**` on local paths), sorted."""
    if not is_url(pattern):
        import glob as glob_module

        return sorted(glob_module.glob(pattern, recursive=True))
    import fsspec

    _fresh_listings()
    with errors_named(pattern):
        fs, _ = fsspec.core.url_to_fs(pattern)
        scheme = pattern.split("://", 1)[0]
        return sorted(f"{scheme}://{p}" for p in fs.glob(pattern))


def info(path) -> dict:
    """Size and a version of a file: {"size", "version"} (the object generation or etag on object stores,
    the modification time locally), for caches keyed by content."""
    if not is_url(path):
        st = os.stat(path)
        return {"size": st.st_size, "version": f"mtime:{st.st_mtime_ns}"}
    import fsspec

    _fresh_listings()
    with errors_named(path):
        fs, inner = fsspec.core.url_to_fs(path)
        fs.invalidate_cache(inner)
        meta = fs.info(inner)
    version = meta.get("generation") or meta.get("etag") or meta.get("mtime") or meta.get("LastModified")
    return {"size": int(meta["size"]), "version": f"{version}"}


def makedirs(path) -> None:
    """A local directory and its parents; object stores have no directories (nothing to do)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def open_file(path, mode: str = "r", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """A file object for reading, or for writing a whole file (an object is visible only once complete)."""
    if "b" in mode:
        encoding = None
    if not is_url(path):
        with open(path, mode, encoding=encoding) as f:
            yield f
        return
    with errors_named(path):
        with epath_of(path).open(mode, encoding=encoding) as f:
            yield f


def read_text(path) -> str:
    with open_file(path) as f:
        return f.read()


def read_bytes(path) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def check_writable(path, name: str = ".llada_jax_write_check") -> None:
    """Fail early, with one line naming `path`, when an output location in object storage cannot be written (no
    such bucket, no permission): by writing and removing a small object there. Local paths: nothing to do."""
    if not is_url(path):
        return
    probe = join(path, name)
    try:
        with errors_named(path):
            epath_of(probe).write_text("")
            epath_of(probe).unlink()
    except StorageError as e:
        raise StorageError(f"{path}: cannot write there ({str(e).split(': ', 1)[-1]})") from e


def remove_tree(path) -> None:
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with errors_named(path):
        p = epath_of(path)
        if p.exists():
            p.rmtree()


def upload(local: str, url: str, *, last: tuple[str, ...] = ()) -> None:
    """Copy a local file, or a local directory tree, to `url`. In a tree, the files named in `last` (relative
    paths) are copied after all the others, so a reader that waits for them never sees a partial tree."""
    with errors_named(url):
        if os.path.isfile(local):
            with open(local, "rb") as src, epath_of(url).open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
            return
        files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
        for rel in sorted(files, key=lambda r: r in last):
            with open(os.path.join(local, rel), "rb") as src, epath_of(join(url, rel)).open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)


def download(url: str, local: str) -> None:
    """Copy the object or the tree under `url` to the local path `local`."""
    with errors_named(url):
        src = epath_of(url)
        if src.is_file():
            os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
            with src.open("rb") as f, open(local, "wb") as out:
                shutil.copyfileobj(f, out, 16 << 20)
            return
        if not src.is_dir():
            raise FileNotFoundError(url)
        for child in src.iterdir():
            download(str(child), os.path.join(local, child.name))


@functools.lru_cache(maxsize=None)
def _download_dir() -> str:
    directory = tempfile.mkdtemp(prefix="llada_jax_download_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


@functools.lru_cache(maxsize=64)
def local_copy(path: str) -> str:
    """A local path holding the contents of `path`: `path` itself when it is local, else a download (once per
    process, under a temporary directory removed at exit)."""
    if not is_url(path):
        return path
    target = os.path.join(_download_dir(), hashlib.sha1(clean(path).encode()).hexdigest()[:16],
                          os.path.basename(clean(path)))
    download(path, target)
    return target
