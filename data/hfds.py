"""``hfds:PATH_OR_ID``: a Hugging Face ``datasets`` dataset, memory-mapped Arrow, never loaded.

PATH is a ``save_to_disk`` directory (a Dataset: its only split is ``train``; a DatasetDict:
its splits), a ``.parquet``/``.arrow`` file (split ``train``), a directory of parquet files
named the hub way (``train-*.parquet``, ``data/test-*``: ``datasets`` infers the splits), or
a hub id where a network exists. Parquet is converted once to Arrow in the ``datasets``
cache (memory-mapped from then on). Columns: ``image``/``img`` (or any ``Image`` feature),
``text``/``sentence``, ``label``/``labels`` (or any ``ClassLabel``), overridable with
``--image-column/--text-column/--label-column``; keys from a ``__key__``/``id`` column, else
the row index. Only the label (and key) columns are read up front.
"""

from __future__ import annotations

import os

import numpy as np
from kdcache.cache.errors import KdcacheError
from kdcache.data.base import DECODE_RULE, SourceBase, decode_image, missing_split
from kdcache.data.datasets import register_source

IMAGE_NAMES = ("image", "img", "jpg", "png")
TEXT_NAMES = ("text", "sentence", "content", "document")
LABEL_NAMES = ("label", "labels", "cls", "target")
KEY_NAMES = ("__key__", "id", "key")


def _open(path: str, split: str):
    """The split of a local or hub dataset; a missing split names those that exist."""
    import datasets

    datasets.disable_progress_bars()
    what = f"hfds:{path}"
    try:
        if os.path.isdir(path) and (
            os.path.exists(os.path.join(path, "dataset_dict.json"))
            or os.path.exists(os.path.join(path, "state.json"))
        ):
            d = datasets.load_from_disk(path)
        elif os.path.isfile(path) and path.endswith(".arrow"):
            d = datasets.Dataset.from_file(path)
        elif os.path.isfile(path) and path.endswith(".parquet"):
            d = datasets.load_dataset("parquet", data_files={"train": path})
        elif os.path.exists(path) or "/" in path and not path.startswith((".", "/")):
            d = datasets.load_dataset(path)
        else:
            raise KdcacheError(f"{what}: no such file or directory")
    except KdcacheError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (network, format)
        first = (str(e).splitlines() or [""])[0][:200]
        raise KdcacheError(f"cannot open {what} ({type(e).__name__}: {first})") from None
    if isinstance(d, datasets.Dataset):
        if split != "train":
            raise missing_split(what, split, ["train"])
        return d
    if split not in d:
        raise missing_split(what, split, list(d.keys()))
    return d[split]


def _pick(ds, given: str | None, names: tuple, feature_type, what: str, path: str) -> str | None:
    cols = list(ds.column_names)
    if given:
        if given not in cols:
            raise KdcacheError(
                f"hfds:{path} has no {what} column {given!r}; columns: {', '.join(cols)}"
            )
        return given
    for n in names:
        if n in cols:
            return n
    if feature_type is not None:
        for c, f in ds.features.items():
            if isinstance(f, feature_type):
                return c
    return None


class HFDataset(SourceBase):
    """One split of an Arrow-backed dataset; ``load(i)`` reads one row of one column."""

    def __init__(self, path: str, split: str, image_column=None, text_column=None,
                 label_column=None) -> None:  # fmt: skip
        import datasets

        ds = _open(path, split)
        image = _pick(ds, image_column, IMAGE_NAMES, datasets.Image, "image", path)
        text = None if image else _pick(ds, text_column, TEXT_NAMES, None, "text", path)
        label = _pick(ds, label_column, LABEL_NAMES, datasets.ClassLabel, "label", path)
        if image is None and text is None:
            raise KdcacheError(
                f"hfds:{path} has no image or text column (looked for "
                f"{', '.join(IMAGE_NAMES + TEXT_NAMES)}); columns: {', '.join(ds.column_names)}; "
                "pass --image-column or --text-column"
            )
        if label is None:
            raise KdcacheError(
                f"hfds:{path} has no label column (looked for {', '.join(LABEL_NAMES)}); "
                f"columns: {', '.join(ds.column_names)}; pass --label-column"
            )
        self.name, self.split, self.path = f"hfds:{path}", split, path
        self.modality = "image" if image else "text"
        self.column = image or text
        self.decode_rule = DECODE_RULE if image else None
        self.labels, self.classes, self.num_classes = self._labels(ds, label)
        key = next((k for k in KEY_NAMES if k in ds.column_names), None)
        self.keys = [str(k) for k in ds[key]] if key else [f"{i:08d}" for i in range(len(ds))]
        if len(set(self.keys)) != len(self.keys):
            raise KdcacheError(f"hfds:{path} column {key!r} has duplicate keys")
        col = ds.select_columns([self.column])
        if image:
            col = col.cast_column(image, datasets.Image(decode=False))
        self._col = col

    def _labels(self, ds, label: str):
        import datasets

        feat = ds.features[label]
        if ds._indices is None:  # straight from the Arrow column (no Python row objects)
            values = ds.data.column(label).to_numpy(zero_copy_only=False)
        else:
            values = list(ds[label])
        if isinstance(feat, datasets.ClassLabel):
            labels, classes = np.asarray(list(values), dtype=np.int64), list(feat.names)
        elif np.asarray(values).dtype.kind in "iu":
            labels, classes = np.asarray(values, dtype=np.int64), None
        else:
            strs = [str(v) for v in values]
            classes = sorted(set(strs))
            index = {c: i for i, c in enumerate(classes)}
            labels = np.asarray([index[s] for s in strs], dtype=np.int64)
        if len(labels) == 0:
            raise KdcacheError(f"hfds:{self.path} split {self.split!r} is empty")
        n_cls = len(classes) if classes else int(labels.max()) + 1
        bad = (labels < 0) | (labels >= n_cls)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise KdcacheError(
                f"hfds:{self.path} column {label!r} row {i} has unknown label {labels[i]} "
                f"(expected 0..{n_cls - 1})"
            )
        return labels, classes, n_cls

    def load(self, i: int):
        value = self._col[int(i)][self.column]
        if self.modality == "text":
            return str(value)
        where = f"row {int(i)} (column {self.column!r}) of hfds:{self.path}"
        if not isinstance(value, dict):
            raise KdcacheError(f"{where} is not an image")
        if value.get("bytes"):
            return decode_image(value["bytes"], where)
        return decode_image(value.get("path") or "", where)

    def head(self, n: int) -> None:
        super().head(n)
        self._col = self._col.select(range(n))


@register_source("hfds:", help="hfds:PATH_OR_ID, a Hugging Face dataset (save_to_disk, parquet)")
def _open_hfds(name: str, root, split: str, download: bool, **kw) -> HFDataset:
    path = name[len("hfds:") :] or (str(root) if root else "")
    if not path:
        raise KdcacheError("hfds: needs a path or hub id, e.g. --dataset hfds:/data/my_ds")
    return HFDataset(
        path,
        split,
        image_column=kw.get("image_column"),
        text_column=kw.get("text_column"),
        label_column=kw.get("label_column"),
    )
