"""Reading weight files and fitting state dicts to networks (shared by every model source).

A weights file is a plain state dict or a checkpoint ``{"model": state_dict, ...}`` (kdcache,
RepDistiller) or ``{"state_dict": ...}``; keys saved from a wrapper (``net.``), DDP
(``module.``) or ``torch.compile`` (``_orig_mod.``) are accepted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping

import torch
from kdcache.cache.errors import KdcacheError
from torch import nn

log = logging.getLogger(__name__)

_PREFIXES_TO_STRIP = ("module.", "_orig_mod.", "net.")


class WeightsFile:
    """A state dict read from disk plus the sha256 of its tensors (`state_dict_sha256`): the
    weights themselves, so a checkpoint's other contents (its run's config and paths, timings,
    optimizer state) never change a cache key that hashes them."""

    def __init__(self, path: str, state_dict: dict[str, torch.Tensor], sha256: str) -> None:
        self.path, self.state_dict, self.sha256 = path, state_dict, sha256


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor in key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_weights(path: str) -> WeightsFile:
    """Read a plain state dict or a kdcache/RepDistiller checkpoint ``{"model": sd, ...}``."""
    if not os.path.isfile(path):
        raise KdcacheError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise KdcacheError(f"cannot read weights {path!r}: {first_line(e)}") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise KdcacheError(
            f"weights {path!r} is not a state dict (expected a dict of tensors or "
            '{"model": state_dict, ...})'
        )
    return WeightsFile(path, dict(obj), state_dict_sha256(obj))


def _strip_prefixes(sd: dict[str, torch.Tensor], target: set[str]) -> dict[str, torch.Tensor]:
    """Accept state dicts saved from the wrapper (``net.``), DDP (``module.``) or compile."""
    changed = True
    while changed and sd and not set(sd) <= target:
        changed = False
        for p in _PREFIXES_TO_STRIP:
            if all(k.startswith(p) for k in sd) and not any(k.startswith(p) for k in target):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def classifier_key(net: nn.Module) -> str | None:
    """Name of the final classifier's weight: timm's pretrained_cfg or the last Linear."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    head = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(head, (list, tuple)):
        head = head[0] if head else None
    names = dict(net.named_modules())
    if isinstance(head, str) and isinstance(names.get(head), (nn.Linear, nn.Conv2d)):
        return f"{head}.weight"
    last = None
    for n, m in net.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    return None if last is None else f"{last}.weight"


def num_outputs(net: nn.Module) -> int | None:
    key = classifier_key(net)
    return None if key is None else int(net.state_dict()[key].shape[0])


def load_weights_into(
    net: nn.Module,
    state: WeightsFile,
    num_classes: int | None,
    rebuild: Callable[[int], nn.Module],
    path: str | None,
) -> nn.Module:
    """Load ``state`` strictly; rebuild with the checkpoint's class count when none was given."""
    sd = _strip_prefixes(state.state_dict, set(net.state_dict()))
    key = classifier_key(net)
    ckpt_classes = int(sd[key].shape[0]) if key and key in sd and sd[key].dim() >= 1 else None
    if ckpt_classes is not None:
        if num_classes is not None and num_classes != ckpt_classes:
            raise KdcacheError(
                f"--num-classes {num_classes} but weights {path!r} have a {ckpt_classes}-class "
                f"classifier ({key})"
            )
        if ckpt_classes != num_outputs(net):
            net = rebuild(ckpt_classes)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        missing = sorted(set(net.state_dict()) - set(sd))[:3]
        unexpected = sorted(set(sd) - set(net.state_dict()))[:3]
        raise KdcacheError(
            f"weights {path!r} do not fit the model (missing {missing}, unexpected {unexpected}, "
            f"{first_line(e)[:200]})"
        ) from e
    return net


def load_matching(net: nn.Module, sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy tensors whose name and shape match (a new head keeps its init); return skipped."""
    own = net.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(keep, strict=False)
    skipped = sorted(set(own) - set(keep))
    if skipped:
        log.info("kept fresh initialisation for %s", skipped)
    return skipped


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
