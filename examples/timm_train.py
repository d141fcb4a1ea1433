"""KD of a timm student from a kdcache cache: timm's create_model, create_optimizer_v2 and
create_scheduler_v2, kdcache for the data (replayed views) and the teacher targets.

    python examples/timm_train.py --cache TRAIN.zarr --model resnet18 --epochs 30
"""

import argparse

import kdcache
import timm
import torch
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--loss", default="kd")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    cache = kdcache.open_cache(args.cache)
    data = kdcache.CachedDataset(cache, views="one", seed=args.seed)
    model = timm.create_model(args.model, pretrained=False, num_classes=cache.num_classes)
    cfg = resolve_data_config({}, model=model)  # the student's own normalization
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
    opt = create_optimizer_v2(model, opt="sgd", lr=args.lr, weight_decay=5e-4, momentum=0.9)
    sched, epochs = create_scheduler_v2(
        opt, sched="cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs
    )
    loss_fn = kdcache.get_loss(args.loss)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, num_workers=args.workers,
        sampler=kdcache.ChunkSampler(  # chunk-local reads, rank-sharded, a worker its chunks
            data, seed=args.seed, lanes=max(args.workers, 1), batch_size=args.batch_size
        ),
        collate_fn=data.collate,  # one shared buffer per batch from each worker
    )  # fmt: skip
    for epoch in range(epochs):
        data.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        model.train()
        total, correct, n = 0.0, 0, 0
        for b in loader:
            out = model((b["input"].float() - mean) / std)
            loss = loss_fn(out, b["teacher_logits"], b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(out)
            correct += int((out.argmax(1) == b["label"]).sum())
            n += len(out)
        sched.step(epoch + 1)
        print(f"epoch {epoch} loss {total / n:.4f} train_acc {correct / n:.4f} {loss_fn.terms}")
    return {"loss": total / n, "train_acc": correct / n, "epochs": epochs}


if __name__ == "__main__":
    main()
