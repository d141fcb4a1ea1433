"""View policies: seeded params, batched apply vs. per-image references, text masking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache.errors import KdcacheError
from data.views import (
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
    full = view_params_for(pol, 7, np.arange(20), 4, identity_view=False)
    assert full.shape == (20, 4, pol.param_dim) and full.dtype == np.float32
    subset = np.array([13, 2, 19])
    np.testing.assert_array_equal(view_params_for(pol, 7, subset, 4, False), full[subset])
    np.testing.assert_array_equal(view_params_for(pol, 7, subset, 2, False), full[subset, :2])
    with_id = view_params_for(pol, 7, subset, 4, identity_view=True)
    np.testing.assert_array_equal(with_id[:, 1:], full[subset, 1:])
    assert (with_id[:, 0] == pol.identity_params()).all()
    if name != "identity":
        assert not np.array_equal(view_params_for(pol, 8, subset, 4, False), full[subset])
    rng = np.random.Generator(np.random.Philox(key=_sample_key(7, 13)))
    np.testing.assert_array_equal(pol.sample_params(rng), full[13, 0])


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


def test_identity_view_equals_eval_transform():
    raw = _raw(4)
    eval_view = get_policy("identity").apply(raw, torch.zeros(4, 1))
    torch.testing.assert_close(eval_view, raw.float() / 255)
    crop = get_policy("crop-flip")
    ident = torch.from_numpy(np.tile(crop.identity_params(), (4, 1)))
    torch.testing.assert_close(crop.apply(raw, ident), eval_view)
    rrc = get_policy("rrc-flip", size=32)
    ident = torch.from_numpy(np.tile(rrc.identity_params(), (4, 1)))
    torch.testing.assert_close(rrc.apply(raw, ident), eval_view, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [48, 20, (24, 40)])
def test_rrc_full_box_equals_plain_resize(size):
    raw = _raw(3, 32, 32)
    pol = get_policy("rrc-flip", size=size)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(3, 1)
    expected = F.interpolate(raw.float() / 255, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(pol.apply(raw, full), expected, atol=1e-5, rtol=0)
    flipped = full.clone()
    flipped[:, 4] = 1
    torch.testing.assert_close(pol.apply(raw, flipped), expected.flip(-1), atol=1e-5, rtol=0)


def test_rrc_box_crops_the_right_region():
    raw = _raw(1, 32, 32)
    pol = get_policy("rrc-flip", size=16)
    box = torch.tensor([[0.25, 0.5, 0.5, 0.5, 0.0]])  # rows 8..24, cols 16..32 at native scale
    torch.testing.assert_close(
        pol.apply(raw, box), raw[:, :, 8:24, 16:32].float() / 255, atol=1e-5, rtol=0
    )


def test_rrc_params_are_valid_boxes():
    pol = get_policy("rrc-flip", size=32)
    p = view_params_for(pol, 3, np.arange(2000), 2, False).reshape(-1, 5)
    top, left, h, w, flip = p.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all()
    assert (left + w <= 1 + 1e-6).all()
    area, ratio = h * w, w / h
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 0.75 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
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
    assert ids.shape == (len(tiny_texts), 24) and ids.dtype == torch.long
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
