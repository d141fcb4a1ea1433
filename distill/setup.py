"""Resolve a distill config: data, student, view policy, teacher source, loss, optimizer."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from cache.errors import KdcacheError
from distill.config import DistillConfig

log = logging.getLogger(__name__)


@dataclass
class Run:
    model: torch.nn.Module
    info: dict
    modality: str
    train: object
    test: object | None
    policy: object
    teacher: object | None  # CachedTeacher (views + logits from the cache)
    live_teacher: object | None  # a teacher that runs on the views (online KD, MrKD)
    mrkd: object | None
    loss_fn: object
    reg_fn: object | None


def _loss(cfg: DistillConfig):
    from distill.losses import get_loss, loss_defaults, loss_needs_teacher

    hp = dict(cfg.hparams)
    try:
        fn = get_loss(cfg.loss, **hp)
        needs = loss_needs_teacher(cfg.loss)
        defaults = loss_defaults(cfg.loss)
    except ValueError as e:
        raise KdcacheError(str(e)) from None
    return fn, needs, {**defaults, **hp}


def _check_hparams(cfg: DistillConfig, num_classes: int) -> None:
    """Domains that need K (lsr-os-tc: c > 1/K), before any file is written."""
    from distill.losses import check_hparams

    try:
        check_hparams(cfg.loss, dict(cfg.hparams), num_classes)
    except ValueError as e:
        raise KdcacheError(str(e)) from None


def _tokenize(ds, info: dict) -> None:
    from data.views import tokenize_texts
    from models.factory import load_tokenizer

    tok = load_tokenizer(info)
    ds.tokens = tokenize_texts(tok, ds.texts, info["preprocessing"]["max_length"])


def _policy(cfg: DistillConfig, cache, info: dict, modality: str):
    """The cache's view policy (replayed), or --augment when training without a cache."""
    from data.views import get_policy

    if cache is not None:  # the stored params rebuild the very policy the teacher saw
        name, kw = cache.spec.views["policy"], dict(cache.spec.views.get("params") or {})
    else:
        name, kw = cfg.augment, {}
        if modality == "text" and name not in ("identity", "token-mask"):
            name = "identity"
        if name == "token-mask":
            from models.factory import load_tokenizer

            kw["tokenizer"] = load_tokenizer(info)
        if name == "rrc-flip":
            kw["size"] = cfg.image_size or info["preprocessing"]["input_size"][-1]
    return get_policy(name, **kw)


def build_run(cfg: DistillConfig, rt) -> Run:
    """Everything is validated here, before a single step or file write."""
    from data.datasets import load_dataset
    from distill.losses import regularization_samples
    from distill.teachers import CachedTeacher, MrKDTeacher, open_caches
    from models.factory import create_model

    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise KdcacheError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1")
    if cfg.batch_size < rt.world_size:
        raise KdcacheError(
            f"--batch-size {cfg.batch_size} is smaller than the world size "
            f"{rt.world_size}; it is the global batch"
        )
    loss_fn, needs_teacher, hp = _loss(cfg)
    if needs_teacher and not cfg.caches and cfg.loss != "mrkd":
        raise KdcacheError(f"--loss {cfg.loss} needs teacher logits: give --cache PATH")
    train = load_dataset(
        cfg.dataset,
        root=cfg.data_root,
        split=cfg.split,
        download=cfg.download,
        max_samples=cfg.max_samples,
    )
    test = None
    if cfg.test_split and cfg.test_split != "none":
        test = load_dataset(
            cfg.dataset, root=cfg.data_root, split=cfg.test_split, download=cfg.download
        )
    num_classes = cfg.num_classes or train.num_classes
    _check_hparams(cfg, num_classes)
    model, info = create_model(
        cfg.student, num_classes=num_classes, pretrained=cfg.pretrained, weights=cfg.weights
    )
    modality = info.get("modality", "image")
    if modality != train.modality:
        raise KdcacheError(
            f"student {cfg.student!r} takes {modality} but dataset "
            f"{cfg.dataset!r} is {train.modality}"
        )
    teacher = None
    if cfg.caches:
        caches = open_caches(cfg.caches, train, num_classes, cfg.storage_options)
        teacher = CachedTeacher(
            caches, cfg.teacher_view, cfg.ensemble, int(cfg.memory_budget_gb * (1 << 30))
        )
    cache0 = teacher.caches[0] if teacher is not None else None
    if modality == "text":
        tok_info = {"modality": "text", **cache0.spec.teacher} if cache0 is not None else info
        for ds in (train, test):
            if ds is not None:
                _tokenize(ds, tok_info)
    policy = _policy(cfg, cache0, info, modality)
    mrkd = live = None
    if cfg.loss == "mrkd":
        mrkd = live = MrKDTeacher(
            int(hp["M"]), hp["interval"], warmup=int(hp["warmup"]), adjust=bool(hp["ka"]),
            labels=train.labels,
        )  # fmt: skip
        if teacher is not None:  # the cache still gives the views, as for every other loss
            log.info("--loss mrkd: the cache gives the views; the teacher is the student's history")
    elif not needs_teacher and teacher is not None:
        log.info("--loss %s uses no teacher logits; the cache provides the views", cfg.loss)
    reg_fn = None
    if needs_teacher:
        reg_fn = functools.partial(regularization_samples, T=float(hp.get("T", 1.0)))
    if not needs_teacher:
        loss_fn = _ignore_teacher(loss_fn)
    elif cfg.loss == "mrkd":
        loss_fn = _fallback_ce(loss_fn)
    return Run(model, info, modality, train, test, policy, teacher, live, mrkd, loss_fn, reg_fn)


def _ignore_teacher(fn):
    return lambda s, t, y: fn(s, None, y)


def _fallback_ce(fn):
    """MrKD before its first snapshot has no teacher: plain CE."""
    from distill.losses import get_loss

    ce = get_loss("ce")
    return lambda s, t, y: ce(s, None, y) if t is None else fn(s, t, y)


def make_optimizer(cfg: DistillConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=False,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise KdcacheError(f"unknown --optimizer {cfg.optimizer!r}; expected sgd or adamw")


def make_scheduler(cfg: DistillConfig, opt: torch.optim.Optimizer):
    """Per-epoch schedule: the CRD/WSL step recipe, cosine, or constant."""
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    raise KdcacheError(f"unknown --schedule {cfg.schedule!r}; expected step, cosine, constant")
