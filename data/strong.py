"""Strong augmentation composed on a base view policy (identity, crop-flip, rrc-flip):
timm's order per image — base crop/flip, then RandAugment/TrivialAugment/AutoAugment (or
color jitter when no --aa, as timm), then random erasing — and batch-free Mixup/CutMix of
the result with a partner row's view made the same way.

``StrongPolicy`` keeps the base policy's name; its ``params`` are the base's plus
``strong`` (everything that changes pixels, so the spec key covers it; caches without
strong options keep their key). View params: the base's, then ``aa{k}_op/mag/neg/resample``
per layer, the color jitter, the erase rects + seed, then (mixing) the mix fields and the
partner's own base/aa/jitter/erase params (``p_`` prefix). All are functions of the
uniforms of (seed, sample, view) and the original sizes of the sample and its partner.
"""

from __future__ import annotations

import numpy as np
import torch
from kdcache.data import augment, mix
from kdcache.data.strongopts import StrongOptions

REMODES = ("pixel", "rand", "const")
MIX_MODES = ("pair", "elem")


class StrongPolicy:
    """A base policy + the ``strong`` stages (see module docstring)."""

    modality = "image"
    batched = False
    needs_size = True  # drawn in the loader worker, which decodes partners too

    def __init__(self, base, strong: dict) -> None:
        s = dict(strong)
        self.base, self.strong = base, s
        self.name = base.name
        self.aa = augment.parse_aa(s["aa"]) if s.get("aa") else None
        self.cj = mix.jitter_ranges(s["color_jitter"]) if s.get("color_jitter") else None
        self.reprob = float(s.get("reprob", 0.0))
        self.recount = int(s.get("recount", 1))
        self.mixes = float(s.get("mixup", 0.0)) > 0 or float(s.get("cutmix", 0.0)) > 0
        self.pairs = self.mixes and s.get("mixup_mode") == "pair"  # data/pairs.py
        self.hp = {"fill": s.get("fill", [128, 128, 128]), "translate_const": s.get(
            "translate_const", 100)}  # fmt: skip
        self.params = {**base.params, "strong": s}
        names = list(base.param_names)
        for k in range(self.aa["layers"] if self.aa else 0):
            names += [f"aa{k}_{f}" for f in augment.LAYER_FIELDS]
        names += list(mix.CJ_FIELDS) if self.cj else []
        if self.reprob > 0:
            names += [f"re{k}_{f}" for k in range(self.recount) for f in "tlhw"] + ["re_seed"]
        self.single_names = tuple(names)
        if self.mixes:
            names += list(mix.MIX_FIELDS) + [f"p_{n}" for n in self.single_names]
        self.param_names = tuple(names)
        self.k_single = (
            base.num_uniforms + augment.num_uniforms(self.aa) + (8 if self.cj else 0)
            + (mix.erase_uniforms(self.recount) if self.reprob > 0 else 0)
        )  # fmt: skip
        tail = 0 if self.pairs else self.k_single  # pairs: the partner's own uniforms
        self.num_uniforms = self.k_single + (mix.MIX_UNIFORMS + tail if self.mixes else 0)

    @property
    def param_dim(self) -> int:
        return len(self.param_names)

    @property
    def s_dim(self) -> int:
        return len(self.single_names)

    def _single(self, u: np.ndarray, sizes) -> np.ndarray:
        kb, ka = self.base.num_uniforms, augment.num_uniforms(self.aa)
        parts = [self.base.from_uniforms(u[..., :kb], sizes).astype(np.float32)]
        parts.append(augment.draw_layers(self.aa, u[..., kb : kb + ka]))
        at = kb + ka
        if self.cj:
            parts.append(mix.draw_jitter(self.cj, u[..., at : at + 8]))
            at += 8
        if self.reprob > 0:
            ue = u[..., at : at + mix.erase_uniforms(self.recount)]
            parts.append(mix.draw_erase(self.reprob, self.recount, self.strong["size"], ue))
        return np.concatenate(parts, axis=-1)

    def partner_rows(self, u: np.ndarray) -> np.ndarray:
        """(..., K) uniforms -> (...,) partner rows (-1: this view does not mix)."""
        if not self.mixes:
            return np.full(u.shape[:-1], -1, dtype=np.int64)
        m = self._mix(u)
        return np.where(m[..., 0] > 0, m[..., 2], -1).astype(np.int64)

    def _mix(self, u: np.ndarray) -> np.ndarray:
        um = u[..., self.k_single : self.k_single + mix.MIX_UNIFORMS]
        key = um.tobytes()  # partner_rows then from_uniforms (other shape): one draw
        memo = getattr(self, "_memo", None)
        if memo is None or memo[0] != key:
            self._memo = memo = (key, self._draw_mix(um))
        return memo[1].reshape(um.shape[:-1] + (len(mix.MIX_FIELDS),))

    def _draw_mix(self, um: np.ndarray) -> np.ndarray:
        s = self.strong
        cfg = {k: float(s.get(k, 0.0)) for k in ("mixup", "cutmix")}
        cfg.update(mixup_prob=float(s.get("mixup_prob", 1.0)),
                   switch_prob=float(s.get("switch_prob", 0.5)))  # fmt: skip
        return mix.draw_mix(cfg, s["size"], int(s["num_rows"]), um)

    def from_uniforms(self, u: np.ndarray, sizes=None, partner_sizes=None) -> np.ndarray:
        if self.pairs:
            raise ValueError("pair-mode Mixup params depend on the rows: data.pairs")
        out = self._single(u[..., : self.k_single], sizes)
        if not self.mixes:
            return out
        m = self._mix(u)
        up = u[..., self.k_single + mix.MIX_UNIFORMS :]
        if self.base.needs_size:
            ps = np.ones(u.shape[:-1] + (2,)) if partner_sizes is None else partner_sizes
            ps = np.broadcast_to(np.asarray(ps, dtype=np.float64), u.shape[:-1] + (2,))
            partner = self._single(up, np.where(ps > 0, ps, 1.0))
        else:
            partner = self._single(up, None)
        partner = np.where(m[..., :1] > 0, partner, 0.0).astype(np.float32)
        return np.concatenate([out, m, partner], axis=-1)

    def sample_params(self, rng: np.random.Generator, size=None) -> np.ndarray:
        return self.from_uniforms(rng.random(self.num_uniforms), size)

    def identity_params(self) -> np.ndarray:
        out = np.zeros(self.param_dim, dtype=np.float32)
        out[: self.base.param_dim] = self.base.identity_params()
        for k, n in enumerate(self.param_names):
            if n.endswith("_op"):
                out[k] = -1.0
            elif n.startswith("cj_order"):
                out[k] = float(n[-1])
            elif n in ("cj_b", "cj_c", "cj_s", "cj_h"):
                out[k] = -1.0
            elif n == "mix_lam":
                out[k] = 1.0
        return out

    def _one(self, img, q: np.ndarray) -> np.ndarray:
        """Base view, then aa or jitter (PIL), then erasing: uint8 (3, H, W) numpy."""
        from kdcache.data.transforms import crop_resize_pil
        from PIL import Image

        nb = self.base.param_dim
        at = nb + 4 * (self.aa["layers"] if self.aa else 0)
        layers, cj = q[nb:at], q[at : at + 8] if self.cj else None
        if (layers[0::4] >= 0).any() or (cj is not None and (cj[4:] != -1).any()):
            b = q[:nb]
            if self.base.name == "rrc-flip" and not (b[2] == 0 and b[3] == 0):
                p = self.base.params  # the same pixels as its view, kept as PIL
                pil = crop_resize_pil(img, b, p["size"], p["interpolation"])
            else:
                x = self.base.view(img, b).numpy()
                pil = Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0)))
            pil = augment.apply_layers(pil, layers, self.hp)
            if cj is not None:
                pil = mix.apply_jitter(pil, cj)
            x = np.asarray(pil).transpose(2, 0, 1)
        else:
            x = self.base.view(img, q[:nb]).numpy()
        x = np.ascontiguousarray(x)
        if self.reprob > 0:
            at += 8 if self.cj else 0
            s = self.strong
            x = mix.apply_erase(x, q[at:], s["remode"], s["mean"], s["std"])
        return x

    def view(self, img, params, partner=None) -> torch.Tensor:
        """The final (mixed) uint8 view; ``partner`` = the partner row's original image."""
        p = np.asarray(params, dtype=np.float32)
        if self.mixes and p[self.s_dim] > 0 and partner is None:
            raise ValueError("a mixed view needs its partner's image")
        images = {0: img, 1: partner}
        return torch.from_numpy(self.view_memo(0, p, images.__getitem__, {}, partner_row=1))

    def view_memo(self, row: int, params, load, memo: dict, partner_row=None) -> np.ndarray:
        """uint8 (3, H, W) view of cache ``row``; ``load(row)`` gives an original and
        ``memo`` keeps pre-mix views by (row, params) within a batch, so the two views of a
        Mixup/CutMix pair make each pre-mix view once. Never mutates a memo entry."""
        p = np.asarray(params, dtype=np.float32)
        x = self._premix(row, p[: self.s_dim], load, memo)
        if self.mixes and p[self.s_dim] > 0:
            m = p[self.s_dim : self.s_dim + len(mix.MIX_FIELDS)]
            j = int(m[2]) if partner_row is None else partner_row
            y = self._premix(j, p[self.s_dim + len(mix.MIX_FIELDS) :], load, memo)
            x = mix.apply_mix(x, y, m)
        return np.ascontiguousarray(x)

    def _premix(self, row: int, q: np.ndarray, load, memo: dict) -> np.ndarray:
        key = (row, q.tobytes())
        x = memo.get(key)
        if x is None:
            x = memo[key] = self._one(load(row), q)
        return x

    def partners_in(self, view_params: np.ndarray, rows, augs) -> np.ndarray:
        """Partner rows of the stored (N, A, P) ``view_params`` at (rows, augs), -1 where a
        view does not mix; reads two columns, not whole rows (stage-2 plans, every epoch)."""
        mode = view_params[rows, augs, self.s_dim]
        return np.where(mode > 0, view_params[rows, augs, self.s_dim + 2], -1).astype(np.int64)

    def mix_of(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(partner rows, lam) of (B, P) params; rows -1 / lam 1 where nothing mixes."""
        p = np.asarray(params, dtype=np.float32).reshape(len(params), -1)
        if not self.mixes:
            return np.full(len(p), -1, np.int64), np.ones(len(p), np.float32)
        on = p[:, self.s_dim] > 0
        rows = np.where(on, p[:, self.s_dim + 2], -1).astype(np.int64)
        return rows, np.where(on, p[:, self.s_dim + 1], 1.0).astype(np.float32)

    def apply(self, raw_batch, params):
        raise NotImplementedError("strong augmentation is made per sample (no batched path)")

    def __repr__(self) -> str:
        return f"StrongPolicy({self.base!r}, {self.strong})"


STRONG_DEFAULTS = StrongOptions().strong()
_FLAGS = {"aa": "--aa", "color_jitter": "--color-jitter", "reprob": "--reprob",
          "remode": "--remode", "recount": "--recount", "mixup": "--mixup",
          "cutmix": "--cutmix", "mixup_prob": "--mixup-prob",
          "switch_prob": "--mixup-switch-prob", "mixup_mode": "--mixup-mode"}  # fmt: skip


def _given(opts: dict) -> list[str]:
    return [k for k, v in opts.items() if k in _FLAGS and v is not None and v != STRONG_DEFAULTS[k]]


def _check(opts: dict) -> None:
    from kdcache.cache.errors import KdcacheError

    def bad(k: str, v, want: str) -> KdcacheError:
        return KdcacheError(f"{_FLAGS[k]} {v!r}: expected {want}")

    for k in ("reprob", "mixup_prob", "switch_prob"):
        if not 0.0 <= float(opts[k]) <= 1.0:
            raise bad(k, opts[k], "a probability in [0, 1]")
    for k in ("mixup", "cutmix", "color_jitter"):
        if opts[k] is not None and not float(opts[k]) >= 0.0:
            raise bad(k, opts[k], "an alpha/strength >= 0 (0: off)")
    if opts["remode"] not in REMODES:
        raise bad("remode", opts["remode"], f"one of {', '.join(REMODES)}")
    if int(opts["recount"]) < 1:
        raise bad("recount", opts["recount"], "a count >= 1")
    if opts["aa"]:
        augment.parse_aa(opts["aa"])
    if opts.get("mixup_mode") not in (None, *MIX_MODES):
        raise bad("mixup_mode", opts["mixup_mode"], f"one of {', '.join(MIX_MODES)}")


def resolve_strong(opts: dict | None, dataset, base, mean, std, cached: bool = True) -> dict | None:
    """The ``strong`` params of a run from the --aa/--color-jitter/--reprob/--mixup...
    options (None when none is on: the base policy and its key are unchanged). Only what
    changes pixels goes in; as in timm, --color-jitter is off when --aa is given. Mixing
    defaults to pair mode for a cache (``cached``) and is elem mode without one."""
    from kdcache.cache.errors import KdcacheError

    opts = {**STRONG_DEFAULTS, **{k: v for k, v in (opts or {}).items() if v is not None}}
    given = _given(opts)
    if not given:
        return None
    if dataset.modality != "image":
        raise KdcacheError(
            f"{_FLAGS[given[0]]} is image augmentation; dataset {dataset.name!r} is "
            f"{dataset.modality} (expected an image dataset, or drop the option)"
        )
    _check(opts)
    size = base.params.get("size") or (base.params.get("eval") or {}).get("size")
    if not size:
        size = list(dataset.get(np.array([0])).shape[-2:])
    out: dict = {"size": [int(v) for v in size]}
    if opts["aa"]:
        out["aa"] = str(opts["aa"]).strip()
        out["fill"] = [min(255, round(255 * float(m))) for m in mean]
        out["translate_const"] = int(min(out["size"]) * 0.45)
    elif opts["color_jitter"]:
        out["color_jitter"] = float(opts["color_jitter"])
    if opts["reprob"] > 0:
        out.update(reprob=float(opts["reprob"]), remode=opts["remode"],
                   recount=int(opts["recount"]), mean=[float(m) for m in mean],
                   std=[float(s) for s in std])  # fmt: skip
    if opts["mixup"] > 0 or opts["cutmix"] > 0:
        out.update(mixup=float(opts["mixup"]), cutmix=float(opts["cutmix"]),
                   mixup_prob=float(opts["mixup_prob"]), num_rows=len(dataset))  # fmt: skip
        if opts["mixup"] > 0 and opts["cutmix"] > 0:
            out["switch_prob"] = float(opts["switch_prob"])
        mode = opts.get("mixup_mode") or ("pair" if cached else "elem")
        if mode == "pair" and not cached:
            raise KdcacheError(
                "--mixup-mode 'pair' pairs cache rows; without a cache views mix in elem "
                "mode (expected --mixup-mode elem, or drop it)"
            )
        if mode == "pair":  # elem caches keep the key they had before pair mode existed
            from kdcache.data.pairs import GROUP

            out.update(mixup_mode="pair", mix_group=GROUP)
    return out if len(out) > 1 else None  # e.g. --color-jitter 0: nothing changes pixels
