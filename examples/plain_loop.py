"""WSL distillation in a plain PyTorch loop, from a kdcache cache, through the public API.

    python examples/plain_loop.py --cache TRAIN.zarr --test-cache TEST.zarr --epochs 30
The same recipe as `kdcache distill --student resnet8 --loss wsl --schedule cosine` (README
"Use it from Python" compares the two over 3 seeds). TEST.zarr is any cache of the test split
with an identity view (`kdcache.precompute(split="test", num_augs=1, ...)`): its view 0 is
the eval view, so the test set comes through the same API.
"""

import argparse

import kdcache
import torch
from kdcache.models.factory import create_model  # the student factory `distill` uses


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--test-cache", required=True)
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    train = kdcache.CachedDataset(kdcache.open_cache(args.cache), views="one", seed=args.seed)
    test = kdcache.CachedDataset(args.test_cache, views="all")  # 1 view: the eval view
    model, _ = create_model(args.student, num_classes=train.cache.num_classes)
    loss_fn = kdcache.get_loss("wsl", T=4.0, alpha=2.25)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed), collate_fn=train.collate,
    )  # fmt: skip
    for epoch in range(args.epochs):
        train.set_epoch(epoch)  # the cached view of each row this epoch
        model.train()
        for b in loader:
            x = b["input"].float().div_(255.0)  # uint8 views, as the teacher saw them
            loss = loss_fn(model(x), b["teacher_logits"], b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for b in torch.utils.data.DataLoader(test, batch_size=256):
            correct += (model(b["input"].float() / 255).argmax(1) == b["label"]).sum().item()
    acc = correct / len(test)
    print(f"test_acc {acc:.4f} ({len(test)} samples, {args.epochs} epochs, seed {args.seed})")
    return acc


if __name__ == "__main__":
    main()
