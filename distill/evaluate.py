"""`cli.py evaluate`: top-1 accuracy of a checkpoint on a dataset split (eval view)."""

from __future__ import annotations

import click

from cache.errors import KdcacheError


def run_evaluate(
    model: str,
    weights: str,
    dataset: str = "digits",
    data_root: str | None = None,
    split: str = "test",
    num_classes: int | None = None,
    batch_size: int = 256,
    image_size: int | None = None,
    device: str = "auto",
) -> dict:
    """Load the model through the shared factory and print its accuracy."""
    from data.datasets import load_dataset
    from data.views import get_policy
    from distill.loop import evaluate_model
    from models.factory import create_model
    from models.runtime import resolve_device

    dev = resolve_device(device)
    ds = load_dataset(dataset, root=data_root, split=split)
    net, info = create_model(model, num_classes=num_classes, weights=weights)
    if info.get("modality") == "text":
        from distill.setup import _tokenize

        _tokenize(ds, info)
        policy = get_policy("identity")
    elif info.get("modality") != ds.modality:
        raise KdcacheError(
            f"model {model!r} takes {info.get('modality')} but {dataset!r} is {ds.modality}"
        )
    if batch_size < 1:
        raise KdcacheError(f"--batch-size {batch_size} must be >= 1")
    if info.get("modality") != "text" and getattr(ds, "in_ram", False):
        # the eval view of training on 32x32 data: un-augmented, resized to --image-size
        policy = get_policy("identity", size=image_size)
    elif info.get("modality") != "text":  # native images: the model's own eval transform
        from data.loader import make_policy

        policy = make_policy("identity", ds, info, image_size)
    ev = evaluate_model(net.to(dev), ds, policy, dev, batch_size=batch_size)
    acc = ev["correct"] / max(ev["n"], 1.0)
    out = {
        "model": model,
        "weights": weights,
        "dataset": f"{dataset}/{split}",
        "n": int(ev["n"]),
        "accuracy": acc,
        "loss": ev["loss_sum"] / max(ev["n"], 1.0),
    }
    click.echo(f"{model} on {dataset}/{split}: top-1 {acc:.4f} over {int(ev['n'])} samples")
    return out
