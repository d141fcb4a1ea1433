"""Where stage 2's teacher logits come from: the cache (RAM or chunk-aware), a live teacher,
or the student's own history (MrKD). All share `logits(samples, augs, views) -> (B, C)`.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from kdcache.cache.ensemble import combine  # noqa: F401 - re-exported (moved down a layer)
from kdcache.cache.errors import KdcacheError

log = logging.getLogger(__name__)


def open_caches(paths: list[str], dataset, num_classes: int, storage_options: dict | None):
    """Open every cache read-only (never writes, also for URLs) and refuse any that does not
    match the dataset given. A multi-teacher store (`cache merge`) counts as all its members;
    sparse caches (top-k, sampled) read as full-width logits."""
    from kdcache.cache.store import open_members

    caches, names = [], []
    for p in paths:
        members = open_members(p, storage_options or None)
        caches += members
        names += [p] if len(members) == 1 else [c.path for c in members]
    paths = names
    from kdcache.data.loader import match_rows

    first = caches[0]
    rows0 = None
    for p, c in zip(paths, caches, strict=True):
        rows = match_rows(p, c.spec, c.keys, dataset)
        if rows0 is not None and not np.array_equal(rows, rows0):
            raise KdcacheError(
                f"caches {paths[0]} and {p} store their rows in different orders "
                "(dataset.order differs); an ensemble needs the same order"
            )
        rows0 = rows
        if c.num_classes != num_classes:
            raise KdcacheError(
                f"cache {p} has {c.num_classes} classes; the student has {num_classes}"
            )
        c.require_complete()
        if c.spec.views != first.spec.views:
            diff = sorted(
                k
                for k in set(c.spec.views) | set(first.spec.views)
                if c.spec.views.get(k) != first.spec.views.get(k)
            )
            raise KdcacheError(
                f"caches {paths[0]} and {p} do not share views "
                f"(views.{', views.'.join(diff)} differ)"
            )
    for c in caches:
        c.rows = rows0  # cache row -> dataset sample (through the stored keys)
    return caches


class CachedTeacher:
    """Cached logits in RAM: one cache in its stored dtype, or a combined float32 array."""

    needs_views = False

    def __init__(self, caches, teacher_view: str, ensemble: str, budget_bytes: int) -> None:
        if teacher_view not in ("same", "mean"):
            raise KdcacheError(f"unknown --teacher-view {teacher_view!r}; expected same or mean")
        self.caches = caches
        self.rows = getattr(caches[0], "rows", None)  # cache row -> dataset sample
        self.num_augs = caches[0].num_augs
        self.view_params = caches[0].view_params()  # (N, A, P): small, replayed every step
        self.teacher_view = teacher_view
        single = len(caches) == 1 and teacher_view == "same"
        need = sum(c.nbytes() + (0 if single else c.dense_nbytes()) for c in caches)
        self.in_ram = need <= budget_bytes
        self.chunked = None
        if not self.in_ram:
            if not single:
                raise KdcacheError(
                    f"ensembles and --teacher-view mean need the caches in RAM ({need} bytes) "
                    f"but --memory-budget-gb allows {budget_bytes}; raise it"
                )
            log.info("cache %s exceeds the RAM budget: chunk-aware reads", caches[0].path)
            self.chunked = caches[0]
            return
        if single:
            self.mem = caches[0].load(budget_bytes)
            self.table = None
        else:
            arrays = []
            for c in caches:
                full = c.load(budget_bytes).full()  # float32 (N, A, C), sparse rebuilt
                arrays.append(full.mean(1) if teacher_view == "mean" else full)
            self.table = combine(arrays, ensemble)
            self.mem = None
        log.info("teacher logits in RAM (%d caches, view=%s)", len(caches), teacher_view)

    def logits(self, samples: np.ndarray, augs: np.ndarray, views=None) -> torch.Tensor:
        if self.mem is not None:
            return torch.from_numpy(self.mem.read(samples, augs))
        if self.teacher_view == "mean":
            return torch.from_numpy(np.ascontiguousarray(self.table[samples]))
        return torch.from_numpy(np.ascontiguousarray(self.table[samples, augs]))

    def params(self, samples: np.ndarray, augs: np.ndarray) -> np.ndarray:
        return self.view_params[samples, augs]


class OnlineTeacher:
    """A teacher model run on the replayed views (online KD, --fill-missing, the proof test).

    On CUDA it runs under the same bf16 autocast as the student (`amp`) on channels_last
    inputs; its logits are returned as float32."""

    needs_views = True

    def __init__(
        self, model: torch.nn.Module, device: torch.device, amp: bool = False, compile: bool = False
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.amp = amp and self.device.type == "cuda"
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.run = torch.compile(self.model) if compile else self.model
        self.info: dict = {}

    @classmethod
    def create(
        cls,
        name: str,
        weights: str | None,
        num_classes: int,
        device: torch.device,
        amp: bool = False,
        compile: bool = False,
    ) -> OnlineTeacher:
        """`distill --teacher NAME [--teacher-weights P]`: built by the shared model factory."""
        from kdcache.models.factory import create_model

        model, info = create_model(name, num_classes=num_classes, weights=weights)
        if info.get("modality", "image") != "image":
            raise KdcacheError(
                f"--teacher {name!r} is a {info.get('modality')} model; online teachers run on "
                "image views (precompute a cache for text teachers)"
            )
        t = cls(model, device, amp=amp, compile=compile)
        t.info = info
        return t

    @torch.no_grad()
    def logits(self, samples, augs, views) -> torch.Tensor:
        from kdcache.models.runtime import forward

        if isinstance(views, torch.Tensor) and views.dim() == 4:
            if views.dtype == torch.uint8:
                views = views.to(torch.float32).div_(255.0)
            views = views.to(self.device, non_blocking=True)
            if self.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = forward(self.run, views)
        return out.float()


class MrKDTeacher:
    """MrKD's teacher: the mean logits of the student's last M frozen copies (no cache).

    Copies are taken at refresh points: the end of every epoch (`interval` None, the default)
    or every `interval` optimizer steps, but none during the first `warmup` epochs. Until the
    first copy exists `logits` returns None and the loss falls back to plain CE, so the KD term
    never pins the student to its random init. With `adjust` (Knowledge Adjustment) each copy's
    output is corrected so the ground-truth class ranks first before the copies are averaged.
    """

    needs_views = True

    def __init__(
        self,
        copies: int,
        interval: int | None = None,
        *,
        warmup: int = 0,
        adjust: bool = True,
        labels=None,
    ) -> None:
        if copies < 1 or (interval is not None and interval < 1) or warmup < 0:
            raise KdcacheError(
                f"mrkd needs M >= 1, interval >= 1 or null, warmup >= 0 "
                f"(got M={copies}, interval={interval}, warmup={warmup})"
            )
        if adjust and labels is None:
            raise KdcacheError("mrkd Knowledge Adjustment needs the training labels")
        self.copies_max, self.interval, self.warmup, self.adjust = copies, interval, warmup, adjust
        self.labels = None
        if labels is not None:
            self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.copies: list[torch.nn.Module] = []
        self.epochs_done = 0

    def _snapshot(self, student: torch.nn.Module) -> None:
        snap = copy.deepcopy(student).eval()
        for p in snap.parameters():
            p.requires_grad_(False)
        self.copies = (self.copies + [snap])[-self.copies_max :]

    def maybe_snapshot(self, student: torch.nn.Module, step: int) -> None:
        """Step mode: every `interval` steps (after the warm-up epochs) a copy joins the queue."""
        if self.interval is not None and self.epochs_done >= self.warmup:
            if step > 0 and step % self.interval == 0:
                self._snapshot(student)

    def end_epoch(self, student: torch.nn.Module, epoch: int) -> None:
        """Called once the last batch of `epoch` (the partial one included) has been trained."""
        self.epochs_done = epoch + 1
        if self.interval is None and self.epochs_done > self.warmup:
            self._snapshot(student)

    @torch.no_grad()
    def logits(self, samples, augs, views) -> torch.Tensor | None:
        from kdcache.distill.losses import knowledge_adjust
        from kdcache.models.runtime import forward

        if not self.copies:
            return None
        outs = [forward(m, views).float() for m in self.copies]
        if self.adjust:
            y = self.labels[torch.as_tensor(np.asarray(samples), dtype=torch.long)]
            outs = [knowledge_adjust(z, y.to(z.device)) for z in outs]
        return torch.stack(outs).mean(0)

    def state(self) -> dict:
        return {"copies": [m.state_dict() for m in self.copies], "epochs_done": self.epochs_done}

    def load_state(self, student: torch.nn.Module, state: dict | list) -> None:
        """Restore the copies (and the epoch count; an old checkpoint stored only the list)."""
        if isinstance(state, list):
            state = {"copies": state, "epochs_done": self.epochs_done}
        self.epochs_done = int(state.get("epochs_done", 0))
        self.copies = []
        for sd in state.get("copies", []):
            snap = copy.deepcopy(student).eval()
            snap.load_state_dict(sd)
            for p in snap.parameters():
                p.requires_grad_(False)
            self.copies.append(snap)
