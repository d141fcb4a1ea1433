"""Strong augmentation ops (data/augment.py, data/mix.py): each replay against timm's (or
torchvision's) own implementation run with the same parameters."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.data import augment, mix
from PIL import Image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _img(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    noise = rng.integers(0, 40, size=(h, w, 3))
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.int64)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", augment.OPS)
def test_aa_op_replay_equals_timm_augment_op(name, monkeypatch):
    """Every op, stored (magnitude, negate, resample) replayed == timm's AugmentOp."""
    from timm.data import auto_augment as taa

    img = _img()
    fill = [round(255 * m) for m in MEAN]
    hp = {"fill": fill, "translate_const": 13}
    for m in (0.0, 3.7, 9.0, 10.0):
        for neg in (False, True):
            for rs in (0, 1):
                monkeypatch.setattr(random, "random", lambda neg=neg: 0.9 if neg else 0.1)
                pil_rs = Image.Resampling.BICUBIC if rs else Image.Resampling.BILINEAR
                hparams = {"img_mean": tuple(fill), "translate_const": 13, "interpolation": pil_rs}
                ours = augment.apply_op(img, name, np.float32(m), neg, rs, hp)
                try:
                    mag = float(np.float32(m))  # the stored (float32) magnitude
                    ref = taa.AugmentOp(name, prob=1.0, magnitude=mag, hparams=hparams)(img)
                except ValueError:  # Posterize to 0 bits: Pillow >= 10 refuses; we give black
                    assert name.startswith("Posterize") and not np.asarray(ours).any()
                    continue
                assert np.array_equal(np.asarray(ours), np.asarray(ref)), (name, m, neg, rs)


def test_aa_layers_follow_the_policy_and_replay():
    """Drawn layers: ops of the config's set, clamped magnitudes, skips with prob p; the
    replay applies exactly the drawn ops in order."""
    cfg = augment.parse_aa("rand-m9-n3-mstd0.5-inc1-p0.7")
    assert cfg["layers"] == 3 and cfg["prob"] == 0.7 and cfg["ops"] == list(augment.RAND_INC_OPS)
    u = np.random.default_rng(0).random((400, augment.num_uniforms(cfg)))
    p = augment.draw_layers(cfg, u).reshape(400, 3, 4)
    ops = p[..., 0]
    allowed = {augment.OP_ID[o] for o in augment.RAND_INC_OPS}
    assert set(np.unique(ops[ops >= 0]).astype(int)) <= allowed
    assert 0.2 < (ops < 0).mean() < 0.4  # skipped with probability 1 - p = 0.3
    assert p[..., 1].min() >= 0 and p[..., 1].max() <= 10 and p[..., 1].std() > 0.3
    img = _img()
    hp = {"fill": [124, 116, 104], "translate_const": 13}
    want = img
    for op, m, neg, rs in p[5]:
        if op >= 0:
            want = augment.apply_op(want, augment.OPS[int(op)], m, neg > 0.5, int(rs), hp)
    got = augment.apply_layers(img, p[5].reshape(-1), hp)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    ta = augment.parse_aa("trivialaugment")
    pt = augment.draw_layers(ta, u[:, : augment.num_uniforms(ta)]).reshape(400, 1, 4)
    assert (pt[..., 0] >= 0).all() and pt[..., 1].max() > 9 and pt[..., 1].min() < 1
    aa = augment.parse_aa("original-mstd0.5")
    pa = augment.draw_layers(aa, u[:, : augment.num_uniforms(aa)]).reshape(400, 2, 4)
    first = {(augment.OPS[int(o)]) for o in pa[:, 0, 0] if o >= 0}
    assert first <= {o for sp in augment.AA_POLICIES["original"] for o, _, _ in [sp[0]]}


@pytest.mark.parametrize(
    "aa", ["rand-m9-q3", "rand-m9-mstdx", "rand-mx", "bogus-m9", "augmix-m5", "rand--m9"]
)
def test_bad_aa_strings_are_refused_naming_the_option(aa):
    with pytest.raises(KdcacheError, match="--aa"):
        augment.parse_aa(aa)


def test_timm_rejects_what_we_reject():
    from timm.data.auto_augment import rand_augment_transform

    with pytest.raises(AssertionError):
        rand_augment_transform("rand-m9-q3", {})


def test_color_jitter_replay_equals_torchvision(monkeypatch):
    from torchvision.transforms import ColorJitter

    ranges = mix.jitter_ranges(0.4)
    u = np.random.default_rng(1).random((5, 8))
    img = _img()
    for p in mix.draw_jitter(ranges, u):
        assert sorted(p[:4].tolist()) == [0, 1, 2, 3] and 0.6 <= p[4] <= 1.4 and p[7] == -1
        fixed = (torch.tensor(p[:4].astype(np.int64)), float(p[4]), float(p[5]), float(p[6]),
                 None)  # fmt: skip
        monkeypatch.setattr(ColorJitter, "get_params", staticmethod(lambda *a, f=fixed: f))
        ref = ColorJitter(0.4, 0.4, 0.4)(img)
        assert np.array_equal(np.asarray(mix.apply_jitter(img, p)), np.asarray(ref))


class _Scripted:
    """Python's random as timm's RandomErasing consumes it, fed our uniforms: per rect its
    (area, aspect) attempt pairs, then its top/left draws (data/mix.py's layout)."""

    def __init__(self, v: np.ndarray, count: int) -> None:
        self.v, self.count, self.rect, self.att, self.ints = v, count, 0, 0, 0

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(random, "random", lambda: float(self.v[0]))
        monkeypatch.setattr(random, "uniform", lambda a, b: a + (b - a) * self._uniform())
        monkeypatch.setattr(
            random, "randint", lambda a, b: a + math.floor(self._int() * (b - a + 1))
        )

    def _w(self) -> np.ndarray:
        return self.v[3 + self.rect * 22 :]

    def _uniform(self) -> float:
        if self.att == 20:  # every attempt of this rect failed: timm goes on to the next
            self.rect, self.att = self.rect + 1, 0
        self.att += 1
        return float(self._w()[self.att - 1])

    def _int(self) -> float:
        self.ints += 1
        if self.count > 1 and self.ints == 1:
            return float(self.v[1])
        k = (self.ints - (2 if self.count > 1 else 1)) % 2
        out = float(self._w()[20 + k])
        if k == 1:
            self.rect, self.att = self.rect + 1, 0
        return out


@pytest.mark.parametrize("mode,count", [("pixel", 1), ("rand", 2), ("const", 1)])
def test_random_erasing_equals_timm(mode, count, monkeypatch):
    """Same rects as timm's RandomErasing fed the same uniforms; the uint8 fill is timm's
    normalized fill (same N(0,1) draws) mapped to pixels, clipped to [0, 255] and rounded."""
    from timm.data import random_erasing as tre

    h, w = 24, 32
    rng = np.random.default_rng(3)
    x = np.asarray(_img(w, h)).transpose(2, 0, 1).copy()
    mean, std = np.array(MEAN)[:, None, None], np.array(STD)[:, None, None]
    erased = 0
    for trial in range(6):
        v = rng.random(mix.erase_uniforms(count))
        v[0] = 0.1  # applied
        p = mix.draw_erase(1.0, count, (h, w), v[None])[0]
        ours = mix.apply_erase(x.copy(), p, mode, MEAN, STD)
        script = _Scripted(v, count)
        script.install(monkeypatch)
        z = iter(_normals(mode, p, count))
        monkeypatch.setattr(tre, "_get_pixels", lambda *a, z=z, **k: next(z))
        ref = torch.from_numpy(((x / 255.0 - mean) / std).astype(np.float32))
        tre.RandomErasing(1.0, mode=mode, max_count=count, device="cpu")(ref)
        ref_px = (ref.numpy().astype(np.float64) * std + mean) * 255.0
        # a uint8 view holds timm's fill clipped to the pixel range, rounded
        assert np.abs(ours - np.clip(ref_px, 0, 255)).max() <= 0.5 + 1e-3, (mode, trial)
        assert _psnr(ours, np.clip(ref_px, 0, 255)) >= 40.0
        changed = np.any(ours != x, axis=0)
        inside = np.zeros_like(changed)
        for k in range(count):
            t, le, hh, ww = (int(q) for q in p[4 * k : 4 * k + 4])
            inside[t : t + hh, le : le + ww] = True
        assert not (changed & ~inside).any()  # only the stored rects change
        erased += bool(changed.any())
    assert erased >= 4


def _normals(mode: str, p: np.ndarray, count: int):
    """The N(0,1) draws our uint8 fill came from, per erased rect (timm's _get_pixels)."""
    out = []
    for k in range(count):
        hh, ww = int(p[4 * k + 2]), int(p[4 * k + 3])
        if hh > 0:
            z = mix.erase_normals(mode, int(p[-1]) * 16 + k, (3, hh, ww))
            out.append(torch.from_numpy(np.array(z)))
    return out


def test_cutmix_box_equals_timm(monkeypatch):
    from timm.data import mixup as tmix

    for lam, cy, cx in [(0.3, 5, 7), (0.8, 0, 31), (0.05, 23, 0), (0.5, 12, 16)]:
        it = iter([cy, cx])
        monkeypatch.setattr(tmix.np.random, "randint", lambda *a, it=it, **k: next(it))
        (yl, yh, xl, xh), lam_ref = tmix.cutmix_bbox_and_lam((3, 24, 32), lam, correct_lam=True)
        box, lam_ours = mix.cutmix_box(lam, cy, cx, 24, 32)
        ref = tuple(int(np.asarray(v).reshape(-1)[0]) for v in (yl, yh, xl, xh))
        assert box == ref and lam_ours == pytest.approx(float(np.asarray(lam_ref).reshape(-1)[0]))


@pytest.mark.parametrize("mode", [1, 2])
def test_mix_replay_equals_timm_elem_mixup(mode, monkeypatch):
    """timm's Mixup (elem mode) on the batch (view, partner) with our lam/box: CutMix
    identical, Mixup >= 40 dB (our blend is rounded to uint8)."""
    from timm.data.mixup import Mixup

    x = np.asarray(_img(32, 24, 1)).transpose(2, 0, 1).copy()
    y = np.asarray(_img(32, 24, 2)).transpose(2, 0, 1).copy()
    if mode == 1:
        p = np.array([1, 0.37, 5, 0, 0, 0, 0], np.float32)
    else:
        (y0, y1, x0, x1), lam = mix.cutmix_box(0.6, 10, 12, 24, 32)
        p = np.array([2, lam, 5, y0, y1, x0, x1], np.float32)
    ours = mix.apply_mix(x, y, p)
    mixer = Mixup(mixup_alpha=1.0 if mode == 1 else 0.0, cutmix_alpha=1.0 if mode == 2 else 0.0,
                  mode="elem", label_smoothing=0.0, num_classes=3)  # fmt: skip
    lam_b = np.array([p[1], 1.0], np.float32)
    cut = np.array([mode == 2, False])
    monkeypatch.setattr(mixer, "_params_per_elem", lambda n: (lam_b, cut))
    if mode == 2:
        it = iter([10, 12])
        monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(it))
        mixer.correct_lam = True
        p_box = mix.cutmix_box(0.6, 10, 12, 24, 32)
        lam_b[0] = 0.6
        assert p_box[1] == pytest.approx(float(p[1]))
    batch = torch.from_numpy(np.stack([x, y]).astype(np.float32))
    mixer._mix_elem(batch)
    ref = batch[0].numpy()
    if mode == 2:
        assert np.array_equal(ours, ref.astype(np.uint8))
    else:
        assert _psnr(ours, ref) >= 40.0 and np.abs(ours - ref).max() <= 0.5 + 1e-4
