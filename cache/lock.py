"""Writer lock: a JSON file next to the cache saying who writes it (user, host, pid, time).

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

from cache.errors import CacheLockedError, KdcacheError

log = logging.getLogger(__name__)


def lock_path(path: str) -> str:
    """The lock file of a cache: a sibling, so it exists before the cache and for both backends."""
    return os.path.abspath(path).rstrip("/") + ".lock"


def read_lock(path: str) -> dict | None:
    """The lock record of a cache, or None when unlocked."""
    try:
        with open(lock_path(path), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"user": "?", "host": "?", "pid": -1, "time": "?", "unreadable": True}


def _pid_alive(pid: int) -> bool:
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
        record.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
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
        "pass break_lock=True (CLI --break-lock) to break it"
    )


class WriterLock:
    """An acquired lock; release() removes the file only if it is still ours."""

    def __init__(self, path: str, record: dict) -> None:
        self.path = path
        self.record = record
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        current = read_lock(self.path)
        if current is not None and current.get("token") == self.record["token"]:
            try:
                os.unlink(lock_path(self.path))
            except FileNotFoundError:
                pass
        else:
            log.warning("lock of %s was broken or replaced by someone else; left alone", self.path)


def acquire(path: str, *, break_lock: bool = False, command: str | None = None) -> WriterLock:
    """Take the writer lock of `path` atomically (temp file + link); CacheLockedError if held."""
    lp = lock_path(path)
    parent = os.path.dirname(lp)
    if not os.path.isdir(parent):
        raise KdcacheError(f"directory {parent} does not exist; cannot create cache {path}")
    record = {
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "unix_time": time.time(),
        "token": uuid.uuid4().hex,
        "command": command,
    }
    tmp = f"{lp}.{record['token']}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    try:
        for _attempt in range(2):
            try:
                _link_exclusive(tmp, lp, record)
                return WriterLock(path, record)
            except FileExistsError:
                existing = read_lock(path) or {}
                stale = is_stale(existing)
                if not (break_lock or stale):
                    raise _refusal(path, existing) from None
                log.warning(
                    "%s lock of %s held by %s",
                    "taking over the stale" if stale else "breaking the",
                    path,
                    existing,
                )
                break_lock = False
                try:
                    os.unlink(lp)
                except FileNotFoundError:
                    pass
        raise _refusal(path, read_lock(path) or {})
    finally:
        os.unlink(tmp)


def _link_exclusive(tmp: str, lp: str, record: dict) -> None:
    """Publish the lock file complete and exclusively (link); O_EXCL where links are missing."""
    try:
        os.link(tmp, lp)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(lp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)


def break_lock(path: str) -> dict | None:
    """Remove the lock of `path`; returns the record that was removed (None if unlocked)."""
    record = read_lock(path)
    try:
        os.unlink(lock_path(path))
    except FileNotFoundError:
        return None
    return record
