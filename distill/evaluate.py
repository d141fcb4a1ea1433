"""`cli.py evaluate`: top-1, top-5 and mean CE of a checkpoint on a dataset split (eval view).

A kdcache checkpoint carries the config of its run, so its model, dataset, data root and
image size are the defaults: `evaluate --weights runs/x/best.pt` needs nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError

log = logging.getLogger(__name__)

# checkpoint config field -> run_evaluate argument defaulted from it
FROM_CHECKPOINT = {
    "student": "model",
    "dataset": "dataset",
    "data_root": "data_root",
    "image_size": "image_size",
    "test_split": "split",  # the split the run evaluated on (e.g. val), unless it was none
}


def load_checkpoint(path: str | Path, option: str = "--weights") -> dict:
    """A kdcache checkpoint (`{"model": state_dict, "config": ..., ...}`), read with
    weights_only=True; anything else is one error naming `option` and the file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise KdcacheError(
            f"{option}: {str(path)!r} is not a readable kdcache checkpoint "
            f"({type(e).__name__}); expected a last.pt/best.pt written by `kdcache distill` "
            "(delete it to start over)"
        ) from None
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        raise KdcacheError(
            f"{option}: {str(path)!r} is not a kdcache checkpoint (no 'model' state dict); "
            "expected a last.pt/best.pt written by `kdcache distill`"
        )
    return ck


def checkpoint_defaults(weights: str) -> dict:
    """Model, dataset, data root, image size and evaluated split of the run that wrote
    `weights` ({} for a plain state dict, whose run is unknown)."""
    try:
        ck = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - create_model reports unreadable files properly
        return {}
    cfg = ck.get("config") if isinstance(ck, dict) else None
    if not isinstance(cfg, dict):
        return {}
    out = {arg: cfg.get(field) for field, arg in FROM_CHECKPOINT.items() if cfg.get(field)}
    if out.get("split") == "none":
        del out["split"]
    if "image_size" not in out and cfg.get("caches"):
        size = _cache_view_size(cfg["caches"][0], cfg.get("storage_options"))
        if size:
            out["image_size"] = size
    return out


def _cache_view_size(path: str, storage_options: dict | None) -> int | list | None:
    """The output size of the cache's views (rrc-flip), which training evaluated at."""
    from kdcache.cache.meta import read_meta

    try:
        meta = read_meta(path, storage_options or None)
    except Exception as e:  # noqa: BLE001 - the cache may live elsewhere; say so, go on
        log.warning("cannot read the training cache %s (%s); give --image-size if it "
                    "used rrc-flip views", path, e)  # fmt: skip
        return None
    spec = meta.get("spec") or next(
        (m.get("spec") for m in meta.values() if isinstance(m, dict) and m.get("spec")), {}
    )
    size = ((spec.get("views") or {}).get("params") or {}).get("size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if isinstance(size, (int, list)) and size else None


def run_evaluate(
    weights: str,
    model: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    split: str | None = None,
    num_classes: int | None = None,
    batch_size: int = 256,
    image_size: int | None = None,
    device: str = "auto",
    per_class: bool = False,
) -> dict:
    """Evaluate `weights` on one split; returns top1/top5/loss (and per-class rows)."""
    from kdcache.data.datasets import load_dataset
    from kdcache.data.views import get_policy
    from kdcache.models.factory import create_model
    from kdcache.models.runtime import resolve_device

    given = {"model": model, "dataset": dataset, "data_root": data_root, "image_size": image_size}
    given["split"] = split
    ck = checkpoint_defaults(weights)
    if dataset is not None and dataset != ck.get("dataset"):
        ck.pop("split", None)  # the run's evaluated split belongs to the run's dataset
    args = {k: v if v is not None else ck.get(k) for k, v in given.items()}
    split = args["split"] or "test"
    if args["model"] is None:
        raise KdcacheError(
            f"--model is required: {weights!r} is a plain state dict without a kdcache run "
            "config; expected --model NAME (e.g. resnet8)"
        )
    args["dataset"] = args["dataset"] or "digits"
    if batch_size < 1:
        raise KdcacheError(f"--batch-size {batch_size} must be >= 1")
    dev = resolve_device(device)
    ds = load_dataset(args["dataset"], root=args["data_root"], split=split)
    net, info = create_model(args["model"], num_classes=num_classes, weights=weights)
    if info.get("modality") == "text":
        from kdcache.distill.setup import _tokenize

        _tokenize(ds, info)
        policy = get_policy("identity")
    elif info.get("modality") != ds.modality:
        raise KdcacheError(
            f"model {args['model']!r} takes {info.get('modality')} but {args['dataset']!r} "
            f"is {ds.modality}"
        )
    if batch_size < 1:
        raise KdcacheError(f"--batch-size {batch_size} must be >= 1")
    image_size = args["image_size"]
    if info.get("modality") != "text" and getattr(ds, "in_ram", False):
        # the eval view of training on 32x32 data: un-augmented, resized to --image-size
        policy = get_policy("identity", size=image_size)
    elif info.get("modality") != "text":  # native images: the model's own eval transform
        from kdcache.data.loader import make_policy

        policy = make_policy("identity", ds, info, image_size)
    stats = _evaluate(net.to(dev), ds, policy, dev, batch_size)
    out = {
        **{k: args[k] for k in ("model", "dataset", "data_root", "image_size")},
        "weights": weights,
        "split": split,
        "from_checkpoint": sorted(k for k in ck if given[k] is None),
        **_summary(stats, ds, per_class),
    }
    log.info("evaluate %s", {k: v for k, v in out.items() if k != "per_class"})
    return out


def _evaluate(net, ds, policy, device, batch_size: int) -> dict:
    """Per-class top-1/top-5 hits and CE sums over every sample's eval view."""
    from kdcache.distill.feed import to_input
    from kdcache.distill.loop import eval_batches
    from kdcache.models.runtime import forward

    net.eval()
    labels = np.asarray(ds.labels, dtype=np.int64)
    k = ds.num_classes
    hits1, hits5, count = np.zeros(k), np.zeros(k), np.zeros(k)
    loss = 0.0
    with torch.inference_mode():
        for s, views in eval_batches(ds, policy, batch_size):
            x = to_input(views, device)
            y = torch.from_numpy(labels[s]).to(device)
            logits = forward(net, x).float()
            if logits.shape[1] <= int(y.max()):
                raise KdcacheError(
                    f"the model has {logits.shape[1]} classes but {ds.name}/{ds.split} has "
                    f"labels up to {int(y.max())}; expected the --dataset it was trained on"
                )
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            c1 = (top[:, 0] == y).cpu().numpy()
            c5 = (top == y[:, None]).any(1).cpu().numpy()
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            np.add.at(hits1, labels[s], c1)
            np.add.at(hits5, labels[s], c5)
            np.add.at(count, labels[s], 1)
    return {"hits1": hits1, "hits5": hits5, "count": count, "loss": loss}


def _summary(st: dict, ds, per_class: bool) -> dict:
    n = float(st["count"].sum())
    out = {
        "n": int(n),
        "top1": float(st["hits1"].sum() / max(n, 1.0)),
        "top5": float(st["hits5"].sum() / max(n, 1.0)),
        "loss": st["loss"] / max(n, 1.0),
    }
    if per_class:
        names = ds.classes or [str(i) for i in range(ds.num_classes)]
        out["per_class"] = [
            {
                "class": i,
                "name": str(names[i]) if i < len(names) else str(i),
                "n": int(st["count"][i]),
                "top1": float(st["hits1"][i] / st["count"][i]) if st["count"][i] else None,
            }
            for i in range(ds.num_classes)
        ]
    return out


def format_result(r: dict) -> str:
    """The human-readable report of `evaluate` (JSON via --json)."""
    src = (
        f" (from the checkpoint: {', '.join(r['from_checkpoint'])})" if r["from_checkpoint"] else ""
    )
    lines = [
        f"{r['model']} on {r['dataset']}/{r['split']}: {r['n']} samples{src}",
        f"top-1 {r['top1']:.4f}",
        f"top-5 {r['top5']:.4f}",
        f"loss  {r['loss']:.4f}",
    ]
    if "per_class" in r:
        width = max([5] + [len(c["name"]) for c in r["per_class"]])
        lines.append(f"{'class':<{width}}  {'n':>6}  {'top-1':>6}")
        for c in r["per_class"]:
            acc = "-" if c["top1"] is None else f"{c['top1']:.4f}"
            lines.append(f"{c['name']:<{width}}  {c['n']:>6}  {acc:>6}")
    return "\n".join(lines)
