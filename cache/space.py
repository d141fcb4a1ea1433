"""Full disks: refuse a write that cannot fit before starting it, and turn ENOSPC into one
line that says what was kept.

HDF5 cannot survive a failed write: the library keeps dirty metadata in memory and reports
write errors only while releasing handles, so a chunk written into a full disk may seem to
succeed and closing the file afterwards can tear metadata that was consistent on disk. So a
local writer checks the free space before every chunk (the chunk's bytes plus a margin for
metadata) and stops cleanly while everything on disk is still consistent; should another
process fill the disk in between, the HDF5 handle is abandoned without flushing (see
HDF5Backend.abandon), which keeps the state of the last completed chunk.
"""

from __future__ import annotations

import errno
import os

from kdcache.cache import remote
from kdcache.cache.errors import DiskFullError

MARGIN_BYTES = 256 << 10  # HDF5 B-tree nodes, zarr.json rewrites, the lock file


def free_bytes(path: str) -> int | None:
    """Bytes available to us on the filesystem holding `path` (None for URLs)."""
    path = remote.local_path(path)
    if remote.is_remote(path):
        return None
    d = os.path.dirname(os.path.abspath(remote.split_hdf5(path)[0] or path))
    while d and not os.path.isdir(d):
        d = os.path.dirname(d)
    st = os.statvfs(d or ".")
    return st.f_bavail * st.f_frsize


def require_space(path: str, need: int, what: str, kept: str) -> None:
    """DiskFullError before writing `need` bytes (+ margin) that do not fit next to `path`."""
    free = free_bytes(path)
    want = need + max(MARGIN_BYTES, need // 8)
    if free is not None and free < want:
        raise DiskFullError(
            f"no space left on the device of {path}: {what} needs about {want} bytes, "
            f"{free} are free; {kept}; free some space and rerun the same command to resume"
        )


def is_enospc(e: BaseException) -> bool:
    return (
        isinstance(e, OSError)
        and e.errno in (errno.ENOSPC, errno.EDQUOT)
        or ("No space left on device" in str(e) or "errno = 28" in str(e))
    )


def disk_full(path: str, what: str, kept: str) -> DiskFullError:
    return DiskFullError(
        f"no space left on the device of {path} while writing {what}; {kept}; free some space "
        "and rerun the same command to resume"
    )
