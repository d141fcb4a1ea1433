"""The Python face of stage 2: `kdcache.get_loss`, `kdcache.list_losses`, `kdcache.distill`.

`get_loss` wraps the very registry function `kdcache distill` trains with (distill/losses.py),
so a loss computed in a user's loop is the number `distill` computes. `distill(**options)`
takes the CLI's option names in snake_case and the CLI's defaults (read from the click
command itself: one source), and the `kdcache distill` command calls the same `run_options`.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from kdcache.cache.errors import KdcacheError


class Loss(torch.nn.Module):
    """A registered loss bound to its hyper-parameters: `loss(student_logits, teacher_logits,
    labels)` -> scalar tensor (differentiable in the student logits). The unweighted, detached
    terms of the last call (e.g. `ce`, `kd`) are in `loss.terms`."""

    def __init__(self, name: str, hparams: dict[str, Any]) -> None:
        from kdcache.distill import losses

        super().__init__()
        self.name = name
        try:
            self._fn = losses.get_loss(name, **hparams)
            self.hparams: dict[str, Any] = losses.check_hparams(name, hparams)
            self.needs_teacher: bool = losses.loss_needs_teacher(name)
        except ValueError as e:
            raise KdcacheError(str(e)) from None
        self.terms: dict[str, torch.Tensor] = {}

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if labels is None:
            raise KdcacheError(f"loss {self.name}: labels are required (N,) integers")
        try:
            out = self._fn(student_logits, teacher_logits, labels)
        except ValueError as e:
            raise KdcacheError(str(e)) from None
        self.terms = {k: v for k, v in out.items() if k != "loss"}
        return out["loss"]

    def extra_repr(self) -> str:
        return f"{self.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


def _known(name: str) -> None:
    from kdcache.distill.losses import LOSSES

    if name not in LOSSES:
        close = difflib.get_close_matches(name, list(LOSSES), 3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise KdcacheError(f"unknown loss {name!r}{hint}; known: {', '.join(sorted(LOSSES))}")


def get_loss(name: str, **hparams: Any) -> Loss:
    """The loss `kdcache distill --loss NAME` trains with, as an `nn.Module`.

    Hyper-parameters not given take the registry defaults (`list_losses()`); out-of-domain
    values raise KdcacheError. Teacher-free losses (ce, lsr, tfkd-reg, lsr-os, lsr-os-tc)
    accept `teacher_logits=None`. Two losses need a model-side teacher: `tfkd-self` takes the
    logits of a trained copy of the student (cache them with `kdcache.precompute(teacher=...)`
    and read them like any cache); `mrkd` takes the mean logits of the student's last M frozen
    copies (`kdcache.distill.teachers.MrKDTeacher`: call `end_epoch(model, epoch)` after each
    epoch, `logits(rows, None, inputs)` per batch, plain `get_loss("ce")` while it is None)."""
    _known(name)
    return Loss(name, dict(hparams))


def list_losses() -> list[dict[str, Any]]:
    """Every registered loss: name, teacher ("cache", "history" or "none"), help, hparams
    ([{name, default, domain}]); what `kdcache list losses --json` prints."""
    from kdcache.distill.listing import entries

    return entries("losses")


def run_options(kw: dict) -> dict:
    """The `kdcache distill` command's body: click-parsed options -> the run's result record
    ({} on torchrun ranks other than 0)."""
    from kdcache.cliconfig import parse_hparams, storage_options_dict
    from kdcache.distill.config import DistillConfig
    from kdcache.distill.train import run

    kw = dict(kw)
    hp = parse_hparams(kw.pop("hparam"))
    for name, key in (("temperature", "T"), ("alpha", "alpha")):
        value = kw.pop(name)
        if value is not None:
            hp[key] = value
    kw["hparams"] = hp
    kw["caches"] = list(kw["caches"])
    ms = kw["milestones"]
    try:
        kw["milestones"] = [int(m) for m in str(ms).split(",") if m.strip()]
    except ValueError:
        import click  # the CLI's own message (api_call turns it into a KdcacheError)

        hint = "--milestones"
        raise click.BadParameter(f"{ms!r} is not a list of epochs", param_hint=hint) from None
    kw["storage_options"] = storage_options_dict(kw["storage_options"])
    return run(DistillConfig(**kw))


def distill(**options: Any) -> dict:
    """Train a student exactly as `kdcache distill` does; options are the CLI's in snake_case
    (`cache="c.zarr"` or a list, `hparam={"c": 0.3}`, `milestones=[150, 180]`), defaults are
    the CLI's. Returns the run's result record (what OUT/result.json holds); {} on torchrun
    ranks other than 0. Unknown options raise KdcacheError naming close matches."""
    from kdcache.cliconfig import api_call

    def body(kw: dict, cli_options: dict) -> dict:
        kw["cli_options"] = cli_options
        return run_options(kw)

    return api_call("distill", options, body)
