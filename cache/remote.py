"""fsspec URLs (s3://, https://, gs://, file://): filesystems, existence, deletion, sizes, and
one-line errors for the many exception types remote stores raise.

Zarr caches are read and written chunk object by chunk object on object storage; HDF5 files
are read through fsspec file objects (slower: every HDF5 metadata lookup is a range request)
and written locally only. http(s):// is read-only.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kdcache.cache.errors import KdcacheError

log = logging.getLogger(__name__)

_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ConnectionError",
    "TimeoutError",
    "gaierror",
}
_H5 = re.compile(r"^(.*?\.(?:h5|hdf5))(?:/+(.*?))?/*$", re.IGNORECASE)
_DENIED = {"NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId"}


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def is_http(path: str) -> bool:
    return str(path).lower().startswith(("http://", "https://"))


def local_path(path: str) -> str:
    """file:///x -> /x; other paths unchanged."""
    path = os.fspath(path)
    return path[len("file://") :] if path.startswith("file://") else path


def split_hdf5(path: str) -> tuple[str | None, str | None]:
    """`x.h5` -> (x.h5, None); `x.h5/t0` -> (x.h5, 't0'); not HDF5 -> (None, None)."""
    m = _H5.match(str(path))
    return (m.group(1), m.group(2) or None) if m else (None, None)


def join(path: str, name: str) -> str:
    return f"{str(path).rstrip('/')}/{name}"


def friendly(e: BaseException, url: str) -> KdcacheError:
    """A one-line KdcacheError naming the URL and what went wrong."""
    if isinstance(e, KdcacheError):
        return e
    names = {c.__name__ for c in type(e).__mro__}
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    status = getattr(e, "status", None)
    if isinstance(e, PermissionError) or names & _DENIED or status in (401, 403):
        return KdcacheError(
            f"access denied to {url} ({msg}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or --storage-options)"
        )
    if isinstance(e, FileNotFoundError) or status == 404:
        return KdcacheError(f"nothing at {url} (no such file, prefix or bucket)")
    if names & _UNREACHABLE or isinstance(e, ConnectionError):
        return KdcacheError(f"cannot reach {url} ({msg}); check the URL / endpoint")
    if isinstance(e, ImportError):
        return KdcacheError(f"cannot open {url}: {msg} (install the fsspec backend)")
    if isinstance(e, ValueError) and "protocol" in msg.lower():
        return KdcacheError(f"unknown URL scheme in {url} ({msg})")
    return KdcacheError(f"cannot access {url} ({type(e).__name__}: {msg})")


@contextmanager
def errors(url: str) -> Iterator[None]:
    """Re-raise anything a remote store throws as a one-line KdcacheError."""
    try:
        yield
    except KdcacheError:
        raise
    except Exception as e:  # noqa: BLE001 - s3fs/aiohttp/botocore raise many types
        raise friendly(e, url) from None


def filesystem(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL or local path."""
    import fsspec

    with errors(url):
        return fsspec.core.url_to_fs(url, **(storage_options or {}))


def require_writable(url: str) -> None:
    if is_http(url):
        raise KdcacheError(f"{url} is read-only (http/https); push to s3:// or a local path")


def exists(path: str, storage_options: dict | None = None) -> bool:
    """Whether anything (file, directory, object, prefix) is at `path`."""
    path = local_path(path)
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = filesystem(path, storage_options)
    with errors(path):
        fs.invalidate_cache(p)
        return bool(fs.exists(p))


def delete(path: str, storage_options: dict | None = None) -> None:
    """Remove a cache (directory, file, or every object under a prefix)."""
    path = local_path(path)
    if not is_remote(path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        return
    require_writable(path)
    fs, p = filesystem(path, storage_options)
    with errors(path):
        if fs.exists(p):
            fs.rm(p, recursive=True)
        fs.invalidate_cache(p)


def size(path: str, storage_options: dict | None = None) -> int | None:
    """Bytes under `path` (a file or everything below a directory/prefix); None if unknown."""
    path = local_path(path)
    if not is_remote(path):
        if os.path.isfile(path):
            return os.path.getsize(path)
        total = 0
        for root, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
    try:
        fs, p = filesystem(path, storage_options)
        return int(fs.du(p, total=True))
    except Exception:  # noqa: BLE001 - http cannot list sizes; a size is informational
        return None
