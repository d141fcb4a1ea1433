"""Writer lock: a JSON file (or object) next to the cache saying who writes it (user, host,
pid, time). On S3 it is created with a conditional put, so two writers cannot both win.

A second writer is refused with a message naming the owner. A lock whose process provably is
gone (same host, pid not running: a killed run) is taken over with a warning, so rerunning the
same command resumes; a lock held from another host cannot be checked and is only broken
explicitly (`break_lock=True`, CLI `--break-lock`).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone

from kdcache.cache import remote
from kdcache.cache.errors import CacheLockedError, KdcacheError

log = logging.getLogger(__name__)


def lock_path(path: str) -> str:
    """The lock of a cache: a sibling file/object, so it exists before the cache, for both
    backends and for URLs (`s3://b/x.zarr` -> `s3://b/x.zarr.lock`); an HDF5 member locks
    its file."""
    path = remote.local_path(os.fspath(path))
    path = remote.split_hdf5(path)[0] or path
    if remote.is_remote(path):
        return path.rstrip("/") + ".lock"
    return os.path.abspath(path).rstrip("/") + ".lock"


class _LockFile:
    """Read / create-exclusively / remove the lock file, locally or through fsspec."""

    def __init__(self, path: str, storage_options: dict | None) -> None:
        self.url = lock_path(path)
        self.fs = None
        if remote.is_remote(self.url):
            remote.require_writable(self.url)
            self.fs, self.p = remote.filesystem(self.url, storage_options)

    def read(self) -> bytes | None:
        try:
            if self.fs is None:
                with open(self.url, "rb") as f:
                    return f.read()
            with remote.errors(self.url):
                self.fs.invalidate_cache(self.p)
                return self.fs.cat_file(self.p)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> None:
        """Publish the lock complete and exclusively; FileExistsError when taken."""
        if self.fs is None:
            parent = os.path.dirname(self.url)
            if not os.path.isdir(parent):
                raise KdcacheError(f"directory {parent} does not exist; cannot lock {self.url}")
            tmp = f"{self.url}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                _link_exclusive(tmp, self.url, data)
            except FileExistsError:
                raise
            except OSError as e:
                raise KdcacheError(f"cannot create the lock {self.url} ({e.strerror})") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        try:
            self.fs.pipe_file(self.p, data, mode="create")  # S3 conditional put (If-None-Match)
        except (TypeError, NotImplementedError):  # stores without exclusive create
            if self.read() is not None:
                raise FileExistsError(self.url) from None
            with remote.errors(self.url):
                self.fs.pipe_file(self.p, data)
        except FileExistsError:
            raise
        except Exception as e:  # noqa: BLE001
            raise remote.friendly(e, self.url) from None

    def remove(self) -> bool:
        try:
            if self.fs is None:
                os.unlink(self.url)
            else:
                with remote.errors(self.url):
                    if not self.fs.exists(self.p):
                        return False
                    self.fs.rm_file(self.p)
                    self.fs.invalidate_cache(self.p)
            return True
        except FileNotFoundError:
            return False


def read_lock(path: str, storage_options: dict | None = None) -> dict | None:
    """The lock record of a cache, or None when unlocked."""
    raw = _LockFile(path, storage_options).read()
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"user": "?", "host": "?", "pid": -1, "time": "?", "unreadable": True}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a pid no process can have: no)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def is_stale(record: dict) -> bool:
    """True when the owner ran on this host and its pid no longer runs."""
    if record.get("unreadable"):
        return False
    pid = record.get("pid")
    return (
        record.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)
    )


def _refusal(path: str, record: dict) -> CacheLockedError:
    who = (
        f"{record.get('user', '?')}@{record.get('host', '?')} pid {record.get('pid', '?')} "
        f"since {record.get('time', '?')}"
    )
    if record.get("unreadable"):
        state = "its lock file is unreadable"
    elif is_stale(record):
        state = "the lock is stale (that process no longer runs)"
    else:
        state = "another writer may still be running"
    return CacheLockedError(
        f"cache {path} is locked by {who}; {state}; lock file {lock_path(path)}; "
        "pass --break-lock to break it"
    )


class WriterLock:
    """An acquired lock; release() removes the file only if it is still ours."""

    def __init__(self, path: str, record: dict, storage_options: dict | None = None) -> None:
        self.path = path
        self.record = record
        self.storage_options = storage_options
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        current = read_lock(self.path, self.storage_options)
        if current is not None and current.get("token") == self.record["token"]:
            _LockFile(self.path, self.storage_options).remove()
        else:
            log.warning("lock of %s was broken or replaced by someone else; left alone", self.path)


def acquire(
    path: str,
    *,
    break_lock: bool = False,
    command: str | None = None,
    storage_options: dict | None = None,
) -> WriterLock:
    """Take the writer lock of `path` atomically (link locally, conditional put on S3);
    CacheLockedError naming the owner if held."""
    lf = _LockFile(path, storage_options)
    if lf.fs is None and not os.path.isdir(os.path.dirname(lf.url)):
        raise KdcacheError(
            f"directory {os.path.dirname(lf.url)} does not exist; cannot create cache {path}"
        )
    record = _record(command)
    data = json.dumps(record).encode("utf-8")
    for _attempt in range(3):
        try:
            lf.create(data)
            from kdcache.cache.leftovers import lock_temps

            lock_temps(lf.url)
            return WriterLock(path, record, storage_options)
        except FileExistsError:
            existing = read_lock(path, storage_options)
            if existing is None:  # released in between: try again
                continue
            stale = is_stale(existing)
            if not (break_lock or stale):
                raise _refusal(path, existing) from None
            log.warning(
                "%s lock of %s held by %s",
                "taking over the stale" if stale else "breaking the",
                path,
                existing,
            )
            return take_over(path, existing, storage_options, record)
    raise _refusal(path, read_lock(path, storage_options) or {})


def take_over(
    path: str, seen: dict, storage_options: dict | None = None, record: dict | None = None
) -> WriterLock:
    """Replace the lock record `seen` (stale, or being broken) by ours, or CacheLockedError
    when the lock is no longer `seen`: another writer took it over first.

    Locally the check-remove-create runs under an flock of the lock's directory, which every
    takeover takes, so of two writers that both saw the same dead pid exactly one wins and the
    other never removes the winner's fresh lock by path (a plain acquire cannot slip in
    either: creation is an exclusive link). On object stores the record is re-read just
    before the removal and our own create is conditional; the window left is one request.
    """
    record = record or _record(None)
    data = json.dumps(record).encode("utf-8")
    lf = _LockFile(path, storage_options)
    guard = None
    if lf.fs is None:
        import fcntl

        guard = os.open(os.path.dirname(lf.url), os.O_RDONLY)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock: the re-read check below still runs
            log.warning("cannot flock %s; lock takeover is not atomic there", lf.url)
    try:
        current = read_lock(path, storage_options)
        if current is not None and current != seen:
            raise _refusal(path, current)
        if current is not None:
            lf.remove()
        try:
            lf.create(data)
        except FileExistsError:
            raise _refusal(path, read_lock(path, storage_options) or {}) from None
        from kdcache.cache.leftovers import lock_temps

        lock_temps(lf.url)
        return WriterLock(path, record, storage_options)
    finally:
        if guard is not None:
            os.close(guard)  # releases the flock


def _record(command: str | None) -> dict:
    return {
        "user": _user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "unix_time": time.time(),
        "token": uuid.uuid4().hex,
        "command": command,
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def _link_exclusive(tmp: str, lp: str, data: bytes) -> None:
    """Publish the lock file complete and exclusively (link); O_EXCL where links are missing."""
    try:
        os.link(tmp, lp)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(lp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def break_lock(path: str, storage_options: dict | None = None) -> dict | None:
    """Remove the lock of `path`; returns the record that was removed (None if unlocked)."""
    record = read_lock(path, storage_options)
    if not _LockFile(path, storage_options).remove():
        return None
    return record
