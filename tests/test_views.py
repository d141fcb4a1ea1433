"""View policies: seeded params, batched apply vs. per-image references, text masking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kdcache.cache.errors import KdcacheError
from kdcache.data.views import (
    _sample_key,
    get_policy,
    philox_uniforms,
    tokenize_texts,
    view_digest,
    view_params_for,
)


def _raw(b: int = 8, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["identity", "crop-flip", "rrc-flip", "token-mask"])
def test_params_keyed_only_by_seed_sample_aug(name):
    pol = get_policy(name, mask_id=4) if name == "token-mask" else get_policy(name)
    sizes = np.stack([200 + np.arange(20) * 7, 300 + np.arange(20) * 5], 1)  # (H, W)
    full = view_params_for(pol, 7, np.arange(20), 4, identity_view=False, sizes=sizes)
    assert full.shape == (20, 4, pol.param_dim) and full.dtype == np.float32
    assert pol.param_dim == len(pol.param_names)
    subset = np.array([13, 2, 19])
    sub = sizes[subset]
    np.testing.assert_array_equal(view_params_for(pol, 7, subset, 4, False, sub), full[subset])
    np.testing.assert_array_equal(view_params_for(pol, 7, subset, 2, False, sub), full[subset, :2])
    with_id = view_params_for(pol, 7, subset, 4, identity_view=True, sizes=sub)
    np.testing.assert_array_equal(with_id[:, 1:], full[subset, 1:])
    assert (with_id[:, 0] == pol.identity_params()).all()
    if name != "identity":
        assert not np.array_equal(view_params_for(pol, 8, subset, 4, False, sub), full[subset])
    rng = np.random.Generator(np.random.Philox(key=_sample_key(7, 13)))
    np.testing.assert_array_equal(pol.sample_params(rng, sizes[13]), full[13, 0])


def test_philox_uniforms_match_numpy_generator():
    seed, samples = 2**63 + 5, np.array([0, 1, 2**40, 1234])
    ref = [
        np.random.Generator(np.random.Philox(key=_sample_key(seed, i))).random(10) for i in samples
    ]
    np.testing.assert_array_equal(philox_uniforms(seed, samples, 10), np.stack(ref))


def test_policies_rebuild_from_json_params():
    for name, kw in [("crop-flip", {"pad": 2}), ("rrc-flip", {"size": 48}), ("identity", {})]:
        pol = get_policy(name, **kw)
        again = get_policy(name, **json.loads(json.dumps(pol.params)))
        assert again.params == pol.params
    with pytest.raises(KdcacheError, match="unknown view policy"):
        get_policy("mixup")
    with pytest.raises(KdcacheError, match="bad options"):
        get_policy("crop-flip", bogus=1)


def _crop_flip_reference(img: torch.Tensor, dx: int, dy: int, flip: bool, pad: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    out = F.pad(img, (pad, pad, pad, pad))[:, dy : dy + h, dx : dx + w]
    return (out.flip(-1) if flip else out).float() / 255


def test_crop_flip_matches_per_image_reference():
    pol = get_policy("crop-flip", pad=4)
    raw = _raw(16)
    params = view_params_for(pol, 0, np.arange(16), 1, False)[:, 0]
    assert set(np.unique(params[:, 2])) <= {0.0, 1.0} and params[:, :2].max() <= 8
    out = pol.apply(raw, torch.from_numpy(params))
    assert out.dtype == torch.float32 and out.shape == raw.shape
    for j, (dx, dy, flip) in enumerate(params.astype(int)):
        torch.testing.assert_close(out[j], _crop_flip_reference(raw[j], dx, dy, bool(flip), 4))
    corner = pol.apply(raw[:1], torch.tensor([[0.0, 0.0, 0.0]]))
    assert (corner[0, :, :4, :] == 0).all() and (corner[0, :, :, :4] == 0).all()


@pytest.mark.parametrize("name", ["identity", "crop-flip"])
def test_uint8_views_are_the_bytes_of_the_float_views(name):
    pol = get_policy(name)
    raw = _raw(16)
    u = np.random.default_rng(0).random((16, pol.num_uniforms))
    params = torch.from_numpy(pol.from_uniforms(u) if name != "identity" else
                              np.zeros((16, 1), np.float32))  # fmt: skip
    x = pol.apply_uint8(raw, params)
    assert x.dtype == torch.uint8 and torch.equal(x.float().div_(255), pol.apply(raw, params))
    assert get_policy(name, size=40).apply_uint8(raw, params) is None  # resized: float only
    assert get_policy("rrc-flip").apply_uint8(raw, params) is None


def test_identity_view_equals_eval_transform():
    raw = _raw(4)
    eval_view = get_policy("identity").apply(raw, torch.zeros(4, 1))
    torch.testing.assert_close(eval_view, raw.float() / 255)
    crop = get_policy("crop-flip")
    ident = torch.from_numpy(np.tile(crop.identity_params(), (4, 1)))
    torch.testing.assert_close(crop.apply(raw, ident), eval_view)


def _photo(w: int, h: int, seed: int = 0):
    """A smooth RGB image (gradients + blobs): resampling differences stay small, as on photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
            img[..., c] += rng.uniform(40, 120) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)
        img[..., c] += 60 * (x / w) + 40 * (y / h) * c
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("wh", [(500, 375), (300, 200), (333, 480)])
def test_identity_view_is_timm_eval_transform(wh):
    """The eval view equals timm.data.create_transform(**resolve_data_config(model)) pixels."""
    import timm
    from timm.data import create_transform, resolve_data_config

    img = _photo(*wh)
    for arch in ("resnet18", "vit_tiny_patch16_224"):
        net = timm.create_model(arch, pretrained=False, num_classes=3)
        cfg = resolve_data_config({}, model=net)
        ref = create_transform(**cfg)(img)  # normalized float
        ev = {"size": list(cfg["input_size"][1:]), "crop_pct": cfg["crop_pct"],
              "interpolation": cfg["interpolation"]}  # fmt: skip
        out = get_policy("identity", eval=ev).view(img)
        assert out.dtype == torch.uint8 and tuple(out.shape) == tuple(cfg["input_size"])
        mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
        std = torch.tensor(cfg["std"]).view(3, 1, 1)
        torch.testing.assert_close((out.float() / 255 - mean) / std, ref, atol=1e-5, rtol=0)
        rrc = get_policy("rrc-flip", size=list(cfg["input_size"][1:]), eval=ev)
        assert torch.equal(rrc.view(img, rrc.identity_params()), out)


def test_rrc_draw_is_torchvision_get_params(monkeypatch):
    """Feed torchvision's RandomResizedCrop.get_params the same uniforms: identical boxes."""
    from torchvision.transforms import RandomResizedCrop

    pol = get_policy("rrc-flip", size=224)
    rng = np.random.default_rng(0)
    n_fallback = 0
    for trial in range(300):
        hw = (int(rng.integers(16, 600)), int(rng.integers(16, 600)))
        if trial % 3 == 0:  # extreme aspect ratios exercise the center-crop fallback
            hw = (hw[0], max(1, hw[0] // 9)) if trial % 2 else (max(1, hw[1] // 9), hw[1])
        u = rng.random(pol.num_uniforms)
        if trial % 5 == 0:
            u[:20:2] = 0.999  # huge areas: every attempt fails on non-square images
        queue = list(u[:20])
        ij = list(u[20:22])

        class _Empty:
            def uniform_(self, lo, hi, queue=queue):
                return torch.tensor(float(lo) + (float(hi) - float(lo)) * queue.pop(0),
                                    dtype=torch.float64)  # fmt: skip

        monkeypatch.setattr(torch, "empty", lambda *a, **k: _Empty())
        monkeypatch.setattr(
            torch,
            "randint",
            lambda lo, hi, size, ij=ij: torch.tensor([int(ij.pop(0) * (hi - lo)) + lo]),
        )
        img = torch.zeros(3, *hw)
        i, j, h, w = RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        monkeypatch.undo()
        n_fallback += len(queue) == 0 and len(ij) == 2
        p = pol.from_uniforms(u[None], np.array([hw], dtype=np.float64))[0]
        got = [round(float(p[0]) * hw[0]), round(float(p[1]) * hw[1]),
               round(float(p[2]) * hw[0]), round(float(p[3]) * hw[1])]  # fmt: skip
        assert got == [i, j, h, w], (trial, hw, got, (i, j, h, w))
        assert p[4] == (u[-1] < 0.5)
    assert n_fallback > 5  # the fallback branch was compared too


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_rrc_replay_equals_torchvision_resized_crop():
    """Replay (crop the original, PIL bilinear antialiased resize, flip) vs torchvision's
    tensor resized_crop(antialias=True) of the same box on the same original: >= 40 dB."""
    import torchvision.transforms.functional as TF

    pol = get_policy("rrc-flip", size=224)
    worst = float("inf")
    for k, wh in enumerate([(500, 375), (300, 200), (480, 400), (320, 500)]):
        img = _photo(*wh, seed=k)
        x = TF.pil_to_tensor(img)
        params = view_params_for(pol, k, np.arange(8), 1, False, np.array([wh[::-1]] * 8))[:, 0]
        for p in params:
            out = pol.view(img, p)
            top, left = round(float(p[0]) * wh[1]), round(float(p[1]) * wh[0])
            h, w = round(float(p[2]) * wh[1]), round(float(p[3]) * wh[0])
            ref = TF.resized_crop(x, top, left, h, w, [224, 224], antialias=True)
            ref = ref.flip(-1) if p[4] > 0.5 else ref
            assert out.shape == ref.shape == (3, 224, 224) and out.dtype == torch.uint8
            worst = min(worst, _psnr(out, ref))
    assert worst >= 40.0, worst


def test_rrc_params_are_valid_boxes():
    pol = get_policy("rrc-flip", size=32)
    sizes = np.array([[375, 500]] * 2000)
    p = view_params_for(pol, 3, np.arange(2000), 2, False, sizes).reshape(-1, 5)
    top, left, h, w, flip = p.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all()
    assert (left + w <= 1 + 1e-6).all()
    hp, wp = h * 375, w * 500  # pixels on the original: torchvision's constraints hold there
    area, ratio = hp * wp / (375 * 500), wp / hp
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 0.75 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    assert 0.45 < flip.mean() < 0.55


def test_view_digest_replay():
    pol = get_policy("crop-flip")
    raw = _raw(4)
    params = torch.from_numpy(view_params_for(pol, 1, np.arange(4), 1, False)[:, 0])
    a, b = pol.apply(raw, params), pol.apply(raw.clone(), params.clone())
    assert view_digest(a) == view_digest(b) and len(view_digest(a)) == 64
    assert view_digest(a[1:]) != view_digest(a[:-1])
    assert view_digest(a[1:2]) == view_digest(pol.apply(raw[1:2], params[1:2]))


def test_token_mask(tiny_bert_dir, tiny_texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ids = tokenize_texts(tok, [t for t, _ in tiny_texts], 24)
    assert ids.shape[0] == len(tiny_texts) and ids.shape[1] <= 24 and ids.dtype == torch.long
    assert (ids != tok.pad_token_id).all(1).any()  # dynamic padding: to the longest text
    pol = get_policy("token-mask", tokenizer=tok, p=0.3)
    assert (
        pol.params["mask_id"] == tok.mask_token_id and tok.cls_token_id in pol.params["special_ids"]
    )
    params = torch.from_numpy(view_params_for(pol, 0, np.arange(len(ids)), 1, False)[:, 0])
    assert (params == params.round()).all() and params.max() < 2**24
    out = pol.apply(ids, params)
    again = pol.apply(ids.clone(), params.clone())
    assert torch.equal(out["input_ids"], again["input_ids"])
    special = torch.isin(ids, torch.tensor(pol.params["special_ids"]))
    masked = out["input_ids"] == tok.mask_token_id
    assert not (masked & special).any()
    frac = masked.sum() / (~special).sum()
    assert 0.25 < float(frac) < 0.35
    assert torch.equal(out["attention_mask"], (ids != tok.pad_token_id).long())
    # per-sample determinism: a sample's view does not depend on the rest of the batch
    one = pol.apply(ids[5:6], params[5:6])
    assert torch.equal(one["input_ids"][0], out["input_ids"][5])
    none = pol.apply(ids, torch.from_numpy(np.tile(pol.identity_params(), (len(ids), 1))))
    assert torch.equal(none["input_ids"], ids)
    # dynamic padding: a sample's mask does not depend on how far its batch is padded
    longer = torch.nn.functional.pad(ids, (0, 7), value=tok.pad_token_id)
    padded = pol.apply(longer, params)
    assert torch.equal(padded["input_ids"][:, : ids.shape[1]], out["input_ids"])
