"""Files stored inside a cache (today: a text teacher's tokenizer), so that a cache pulled to
another machine is self-contained: the blob is one uint8 array `tokenizer` holding canonical
JSON {file name: base64 bytes}, and attrs `tokenizer` records its sha256, size and names.
File names are plain names (checked when packing and when unpacking), so a hand-made cache
can never make a reader write outside the directory it unpacks into.
"""

from __future__ import annotations

import base64
import hashlib
import json

from kdcache.cache.errors import CacheCorruptError, KdcacheError
from kdcache.cache.schema import plain_name

TOKENIZER = "tokenizer"


def pack_files(files: dict[str, bytes]) -> tuple[bytes, dict]:
    """(blob, attrs) for a dict of file name -> bytes."""
    if not isinstance(files, dict) or not files:
        raise KdcacheError("tokenizer files must be a non-empty dict of name -> bytes")
    for name in files:
        plain_name(name, "tokenizer file")
    doc = {k: base64.b64encode(bytes(v)).decode("ascii") for k, v in sorted(files.items())}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")
    attrs = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
             "files": sorted(files)}  # fmt: skip
    return blob, attrs


def unpack_files(blob: bytes | None, attrs: dict, where: str) -> dict[str, bytes]:
    """The files of a verified blob; CacheCorruptError when missing or not matching attrs."""
    if blob is None:
        raise CacheCorruptError(f"{where}: attrs list a tokenizer but its array is missing")
    if hashlib.sha256(blob).hexdigest() != attrs.get("sha256"):
        raise CacheCorruptError(
            f"{where}: the stored tokenizer fails its sha256 (corrupt copy); pull the cache again"
        )
    try:
        doc = json.loads(blob.decode("utf-8"))
        files = {plain_name(k, f"{where}: tokenizer file"): base64.b64decode(v, validate=True)
                 for k, v in doc.items()}  # fmt: skip
    except (ValueError, AttributeError, TypeError) as e:
        raise CacheCorruptError(f"{where}: the stored tokenizer is not readable ({e})") from None
    return files
