"""User-facing errors: one line, naming the bad value and what was expected."""


class KdcacheError(Exception):
    """An error caused by user input; the CLI prints it on one line and exits 2."""


class CacheLockedError(KdcacheError):
    """Another writer holds the cache lock."""


class CacheCorruptError(KdcacheError):
    """A chunk's bytes do not match its checksum, or arrays disagree with the spec."""


class AttrsError(CacheCorruptError):
    """The `kdcache` attrs break the schema (hand-edited or damaged): `cache verify` reports
    it as a problem (exit 1), every other command refuses the cache (exit 2)."""


class DiskFullError(KdcacheError):
    """No space left where a cache or checkpoint is written; what was finished is kept."""
