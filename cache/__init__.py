from kdcache.cache.errors import CacheCorruptError, CacheLockedError, KdcacheError

__all__ = ["KdcacheError", "CacheLockedError", "CacheCorruptError"]
