"""Resolve a precompute config into dataset, teacher, view policy and the cache spec.

Shared by stage 1 (to compute) and stage 2 / `cache verify --replay` (to replay views).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.cache.spec import CacheSpec
from kdcache.precompute.config import PrecomputeConfig, parse_shard

SUFFIXES = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5"}


@dataclass
class Setup:
    """Everything a stage-1 run needs, resolved once."""

    dataset: object  # a data.base.Dataset source
    model: torch.nn.Module
    info: dict
    policy: object
    spec: CacheSpec
    backend: str
    modality: str
    maker: object  # data.loader.ViewMaker (dataset + policy + text collate)
    order: np.ndarray  # cache row r holds dataset sample order[r]

    @property
    def batched(self) -> bool:
        """In-RAM images + a batched policy: the in-thread tensor path."""
        from kdcache.data.loader import use_batched

        return use_batched(self.dataset, self.policy)

    def view_params(self, samples: np.ndarray) -> np.ndarray:
        """(B, A, P) params keyed only by (seed, sample, aug) (batched path: same-size images)."""
        from kdcache.data.views import view_params_for

        v = self.spec.views
        return view_params_for(self.policy, v["seed"], samples, v["num_augs"], v["identity_view"])

    def row_views(self, row: int) -> tuple[object, np.ndarray]:
        """(A views, (A, P) params) of one cache row, made in this thread."""
        from kdcache.data.loader import batched_views

        v = self.spec.views
        sample = int(self.order[row])
        if self.batched:
            params = self.view_params(np.array([sample]))
            a, p = params.shape[1:]
            rows = np.full(a, sample)
            return batched_views(self.dataset, self.policy, rows, params.reshape(a, p)), params[0]
        views, params = self.maker.draw(
            sample, v["seed"], v["num_augs"], v["identity_view"], row=int(row)
        )
        return self.maker.collate([(row, views, params)])["views"], params

    def provenance(self, cfg: PrecomputeConfig) -> dict:
        """Stored with the cache, never hashed into its key."""
        return {
            "tool": "kdcache 0.1.0",
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "timm": _version("timm"),
            "transformers": _version("transformers"),
            "python": platform.python_version(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "user": _user(),
            "host": platform.node(),
            "command": cfg.command,
            "dataset": cfg.dataset,
            "data_root": cfg.data_root,
            "weights_origin": self.info.get("weights_origin"),
            "replay_digests": replay_digests(self),
        }


def _version(package: str) -> str | None:
    """Installed version without importing the package (timm pulls in torchvision: seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def replay_digests(setup: Setup, count: int = 3) -> list[dict]:
    """Hashes of a few view tensors, so `cache verify --replay` can prove replay."""
    from kdcache.data.views import view_digest

    n, a = setup.spec.n, setup.spec.num_augs
    picks = sorted({(0, 0), (n - 1, a - 1), (n // 2, min(1, a - 1))})[:count]
    out = []
    for i, j in picks:
        views, _ = setup.row_views(i)
        view = _as_tensor(views)[j : j + 1]
        out.append({"sample": int(i), "aug": int(j), "sha256": view_digest(view)})
    return out


def _as_tensor(view) -> torch.Tensor:
    """Image views, or a text batch's token ids with the padding stripped (so a digest does
    not depend on the other texts of its batch)."""
    if not isinstance(view, dict):
        return view
    ids, mask = view["input_ids"], view["attention_mask"]
    return ids[:, : int(mask.sum(1).max())] if ids.numel() else ids


def _num_classes_arg(cfg: PrecomputeConfig, dataset) -> int | None:
    """Explicit --num-classes wins; weights/pretrained say their own; else the dataset's."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    if cfg.weights or cfg.pretrained:
        return None
    return dataset.num_classes


def build_setup(cfg: PrecomputeConfig, device: torch.device | None = None) -> Setup:
    """Validate options early (before anything is written) and resolve the spec."""
    from kdcache.data.datasets import load_dataset
    from kdcache.data.loader import ViewMaker, make_policy, ordered_fingerprint, row_order
    from kdcache.data.text import TextCollate
    from kdcache.models.factory import create_model, load_tokenizer

    _check_options(cfg)
    dataset = load_dataset(
        cfg.dataset,
        root=cfg.data_root,
        split=cfg.split,
        download=cfg.download,
        max_samples=cfg.max_samples,
        image_column=cfg.image_column,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        storage_options=cfg.storage_options or None,
    )
    extra = (
        {"max_length": cfg.max_length} if cfg.max_length and cfg.teacher.startswith("hf:") else {}
    )
    model, info = create_model(
        cfg.teacher,
        num_classes=_num_classes_arg(cfg, dataset),
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        init_seed=cfg.random_init,
        **extra,
    )
    _check_trained(cfg, info)
    modality = info.get("modality", "image")
    if modality != dataset.modality:
        raise KdcacheError(
            f"teacher {cfg.teacher!r} takes {modality} but dataset "
            f"{cfg.dataset!r} is {dataset.modality}"
        )
    tok = collate = None
    if modality == "text":
        tok = load_tokenizer(info)
        collate = TextCollate(tok, info["preprocessing"]["max_length"])
    policy = make_policy(
        cfg.augment, dataset, info, cfg.image_size, cfg.mask_prob, tok, strong=cfg.strong()
    )
    order, order_spec = row_order(dataset, cfg.seed, getattr(policy, "pairs", False))
    dataset_spec = dataset.spec()
    # the source kind, not its location: the same shards at another path or bucket give the
    # same key (the fingerprint identifies the data); the location goes to provenance
    dataset_spec["name"] = cfg.dataset.split(":", 1)[0] if ":" in cfg.dataset else cfg.dataset
    if order_spec is not None:  # keys/labels/fingerprint are those of the rows
        dataset_spec["order"] = order_spec
        dataset_spec["fingerprint"] = ordered_fingerprint(dataset, order)
    spec = CacheSpec(
        teacher={
            "name": cfg.teacher,
            "source": info["source"],
            "weights_sha256": info.get("weights_sha256"),
            "num_classes": int(info["num_classes"]),
            "preprocessing": info["preprocessing"],
            # only random teachers carry it, so the keys of trained ones are unchanged
            **({} if cfg.random_init is None else {"init_seed": int(cfg.random_init)}),
        },
        dataset=dataset_spec,
        views={
            "policy": policy.name,
            "params": policy.params,
            "num_augs": cfg.num_augs,
            "seed": cfg.seed,
            "identity_view": cfg.identity_view,
            "param_dim": policy.param_dim,
        },
        storage={
            "dtype": cfg.dtype,
            "chunk_samples": cfg.chunk_samples,
            "compression": cfg.compression,
            "topk": cfg.topk,
            "sampled": cfg.sampled,
        },
    )
    return Setup(
        dataset=dataset,
        model=model,
        info=info,
        policy=policy,
        spec=spec,
        backend=_backend(cfg),
        modality=modality,
        maker=ViewMaker(dataset, policy, collate, rows=order),
        order=order,
    )


def _check_trained(cfg: PrecomputeConfig, info: dict) -> None:
    """A teacher without weights gives logits that differ from run to run under one key;
    only an explicitly seeded random teacher is allowed (its seed is in the spec)."""
    if (info.get("weights_origin") or {}).get("kind") == "random":
        raise KdcacheError(
            f"teacher {cfg.teacher!r} has no trained weights: pass --weights PATH or "
            "--pretrained (a random teacher, for tests and smoke runs: --random-init [SEED])"
        )


def _check_options(cfg: PrecomputeConfig) -> None:
    for name in ("num_augs", "chunk_samples", "batch_size"):
        v = getattr(cfg, name)
        if v < 1:
            raise KdcacheError(f"--{name.replace('_', '-')} {v} must be a positive integer")
    if cfg.workers < 0:
        raise KdcacheError(f"--workers {cfg.workers} must be >= 0")
    parse_shard(cfg.shard)
    given = [n for n, v in (("--weights", cfg.weights), ("--pretrained", cfg.pretrained),
             ("--random-init", cfg.random_init is not None)) if v]  # fmt: skip
    if len(given) > 1:
        raise KdcacheError(f"{' and '.join(given)} exclude each other; give one")


def _backend(cfg: PrecomputeConfig) -> str:
    suffix = Path(cfg.out.rstrip("/")).suffix.lower()
    if suffix in SUFFIXES:
        fmt = SUFFIXES[suffix]
        if cfg.format and cfg.format != fmt:
            raise KdcacheError(
                f"--out {cfg.out!r} has suffix {suffix} but --format is {cfg.format}"
            )
        return fmt
    return cfg.format or "zarr"


def slug(name: str) -> str:
    """Filesystem-safe teacher name: `hf:/x/tiny-bert` -> `hf-tiny-bert`."""
    prefix, _, rest = name.rpartition(":")
    rest = rest.rstrip("/").split("/")[-1] if "/" in rest else rest
    s = f"{prefix}-{rest}" if prefix else rest
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "teacher"


def resolve_out_path(cfg: PrecomputeConfig, setup: Setup) -> str:
    """An exact cache path, or `<root>/<dataset>-<split>/<teacher>-<key12>.<ext>` by content."""
    out = cfg.out.rstrip("/")
    if Path(out).suffix.lower() in SUFFIXES:
        path = out
    else:
        ext = ".zarr" if setup.backend == "zarr" else ".h5"
        name = f"{slug(cfg.teacher)}-{setup.spec.key()[:12]}{ext}"
        path = f"{out}/{setup.spec.dataset['name']}-{cfg.split}/{name}"
    if "://" not in path or path.startswith("file://"):
        _check_writable(Path(path.removeprefix("file://")))
    return path


def _check_writable(path: Path) -> None:
    """Fail before computing anything when --out cannot be written."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # a name of our own: torchrun ranks on one host probe the same folder at once
        probe = parent / f".kdcache-probe-{platform.node()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise KdcacheError(f"--out {str(path)!r} is not writable ({e.strerror})") from None
