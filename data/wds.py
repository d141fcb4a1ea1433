"""``wds:URL``: WebDataset tar shards, local or any fsspec URL (``s3://``, ``http://``).

URL may hold brace patterns (``shard-{000..127}.tar``, ``{a,b}``) and a ``{split}`` field;
without ``{split}`` the shards are the only (``train``) split. Members ``KEY.jpg|jpeg|png|
webp`` (or ``KEY.txt`` for text) + ``KEY.cls`` (integer label), key = ``KEY`` (``__key__``).

Random access needs an index of member offsets. The first open of a shard reads it once
front to back (its full size in bytes, sequentially; ~the cost of one download) and stores
``(key, offset, size, label)`` rows in a small JSON file in a local index cache
(``$KDCACHE_INDEX_DIR`` or ``~/.cache/kdcache/wds-index``), keyed by sha256 of the shard
URL + size + mtime/ETag, so a changed shard is re-indexed and nothing is written next to
remote data. Later opens read one stat per shard; each sample is then one ranged read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
from kdcache.cache.errors import KdcacheError
from kdcache.data.base import DECODE_RULE, SourceBase, decode_image, missing_split
from kdcache.data.datasets import register_source

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> a00b a01b a02b; ``{x,y}`` -> x y (zero padding kept)."""
    m = next((m for m in _BRACE.finditer(pattern) if m.group(1) != "split"), None)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        opts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        opts = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return list(itertools.chain.from_iterable(expand_braces(head + o + tail) for o in opts))


def index_dir() -> Path:
    return Path(os.environ.get("KDCACHE_INDEX_DIR") or Path.home() / ".cache/kdcache/wds-index")


def _fs(url: str, storage_options: dict):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _stamp(fs, path: str, url: str) -> str:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise KdcacheError(f"wds shard {url} does not exist") from None
    except Exception as e:  # noqa: BLE001 - network stacks raise many types
        raise KdcacheError(f"cannot reach wds shard {url} ({type(e).__name__}: {e})") from None
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{url}|{info.get('size')}|{tag}"


def _scan(fs, path: str, url: str) -> dict:
    """One sequential pass over a shard: member offsets grouped by key, labels read."""
    samples: dict[str, dict] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                dot = m.name.find(".", m.name.rfind("/") + 1)  # webdataset's key rule
                if dot < 0:
                    continue
                key, ext = m.name[:dot], m.name[dot + 1 :]
                ext = ext.lower()
                s = samples.setdefault(key, {})
                if ext == "cls":
                    s["label"] = tf.extractfile(m).read().decode().strip()
                elif ext in IMAGE_EXTS + TEXT_EXTS:
                    s["member"] = [m.offset_data, m.size, ext]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise KdcacheError(f"wds shard {url} is not a readable tar ({e})") from None
    rows = []
    for key, s in samples.items():
        if "member" not in s or "label" not in s:
            continue  # e.g. metadata-only keys
        rows.append([key, *s["member"], s["label"]])
    if not rows:
        raise KdcacheError(
            f"wds shard {url} is empty: no KEY.{{{','.join(IMAGE_EXTS + TEXT_EXTS)}}} + KEY.cls "
            "member pairs"
        )
    return {"url": url, "rows": rows}


def shard_index(url: str, storage_options: dict | None = None) -> dict:
    """The (cached) index of one shard; see the module docstring for its cost."""
    fs, path = _fs(url, storage_options or {})
    stamp = _stamp(fs, path, url)
    cached = index_dir() / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".json")
    if cached.is_file():
        return json.loads(cached.read_text())
    idx = _scan(fs, path, url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(idx))
    os.replace(tmp, cached)
    return idx


class WebDataset(SourceBase):
    """Samples of a list of tar shards, read by ranged reads through the shard index."""

    def __init__(self, url: str, split: str, storage_options: dict | None = None) -> None:
        if "{split}" in url:
            pattern = url.replace("{split}", split)
        elif split != "train":
            raise missing_split(f"wds:{url} (no {{split}} field in the URL)", split, ["train"])
        else:
            pattern = url
        self.urls = expand_braces(pattern)
        self.storage_options = dict(storage_options or {})
        keys, labels, self._where = [], [], []
        exts = set()
        for s, u in enumerate(self.urls):
            for key, off, size, ext, label in shard_index(u, self.storage_options)["rows"]:
                try:
                    labels.append(int(label))
                except ValueError:
                    raise KdcacheError(
                        f"wds shard {u} sample {key!r} has label {label!r}; expected an integer"
                    ) from None
                keys.append(key)
                self._where.append((s, off, size))
                exts.add(ext)
        if len(set(keys)) != len(keys):
            raise KdcacheError(f"wds:{url} has duplicate __key__s across shards")
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.min() < 0:
            raise KdcacheError(f"wds:{url} has a negative label {int(self.labels.min())}")
        self.name, self.split, self.keys = f"wds:{url}", split, keys
        self.num_classes, self.classes = int(self.labels.max()) + 1, None
        self.modality = "text" if exts <= set(TEXT_EXTS) else "image"
        self.decode_rule = DECODE_RULE if self.modality == "image" else None
        self._files: dict = {}
        self._pid = None

    def _read(self, i: int) -> bytes:
        s, off, size = self._where[int(i)]
        if self._pid != os.getpid():  # fresh handles in every worker process
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        url = self.urls[s]
        try:
            if f is None:
                fs, path = _fs(url, self.storage_options)
                f = self._files[s] = fs.open(path, "rb")
            f.seek(off)
            return f.read(size)
        except Exception as e:  # noqa: BLE001
            raise KdcacheError(f"cannot read wds shard {url} ({type(e).__name__}: {e})") from None

    def load(self, i: int):
        data = self._read(i)
        if self.modality == "text":
            return data.decode("utf-8")
        return decode_image(
            data, f"{self.keys[int(i)]!r} in wds shard {self.urls[self._where[int(i)][0]]}"
        )

    def head(self, n: int) -> None:
        super().head(n)
        self._where = self._where[:n]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": None}


@register_source("wds:", help="wds:URL, WebDataset tar shards (brace patterns; local or fsspec)")
def _open_wds(name: str, root, split: str, download: bool, **kw) -> WebDataset:
    url = name[len("wds:") :] or (str(root) if root else "")
    if not url:
        raise KdcacheError("wds: needs a shard URL, e.g. --dataset wds:/data/shard-{000..009}.tar")
    return WebDataset(url, split, kw.get("storage_options"))
