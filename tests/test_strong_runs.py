"""Strong augmentation end to end: stored params, replay of mixed views (partner decoded),
the teacher's logits on the replayed mixed image, stage 2's λ-mixed labels, spec keys, bad
input, listing and `cache info`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kdcache.cache.store import open_cache

from tests.clitools import cli
from tests.datatools import make_jpeg_folder

DIGITS = ["--dataset", "digits", "--teacher", "resnet8", "--random-init", "0"]
STRONG = ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.5", "--mixup", "0.8", "--cutmix", "1.0"]


def _precompute(out, *extra, n: int = 40, augs: int = 3):
    cli("precompute", *DIGITS, *STRONG, "--max-samples", n, "--num-augs", augs,
        "--chunk-samples", "16", "--out", out, *extra)  # fmt: skip
    return str(out)


@pytest.fixture(scope="module")
def strong_cache(tmp_path_factory):
    return _precompute(tmp_path_factory.mktemp("strong") / "c.zarr", "--batch-size", "7")


def _dataset(n: int = 40):
    from kdcache.data.datasets import load_dataset

    return load_dataset("digits", split="train", max_samples=n)


def _policy(cache):
    from kdcache.data.views import get_policy

    return get_policy(cache.spec.views["policy"], **cache.spec.views["params"])


def _order(cache, ds) -> np.ndarray:
    """Cache row -> dataset sample (pair-mode Mixup caches permute even in-RAM rows)."""
    from kdcache.data.loader import cache_rows

    keys = cache.keys() if callable(cache.keys) else cache.keys
    return cache_rows(cache.spec.dataset, lambda: keys, ds)[0]


def test_params_and_logits_independent_of_batch_and_workers(strong_cache, tmp_path):
    other = _precompute(tmp_path / "w.zarr", "--batch-size", "200", "--workers", "2")
    with open_cache(strong_cache) as a, open_cache(other) as b:
        assert a.key == b.key
        pa, pb = a.view_params(), b.view_params()
        assert np.array_equal(pa, pb)
        np.testing.assert_array_equal(a.read(np.arange(40), np.zeros(40, int)),
                                      b.read(np.arange(40), np.zeros(40, int)))  # fmt: skip
        np.testing.assert_allclose(a.read(np.arange(40), np.full(40, 2)),
                                   b.read(np.arange(40), np.full(40, 2)), atol=1e-2)  # fmt: skip
        policy = _policy(a)
        order = _order(a, _dataset())
    # a function of (seed, sample, view) only: row 17 drawn alone gives its stored params
    from kdcache.data.loader import ViewMaker

    assert policy.pairs and not np.array_equal(order, np.arange(40))
    maker = ViewMaker(_dataset(), policy, rows=order)
    _, alone = maker.draw(int(order[17]), 0, 3, True)
    assert np.array_equal(alone, pa[17])
    mode = pa[:, 1:, policy.s_dim]
    assert (mode == 1).any() and (mode == 2).any()  # both mixup and cutmix views
    ops = pa[:, 1:, policy.base.param_dim]
    assert (ops >= 0).any() and np.array_equal(pa[:, 0], np.broadcast_to(
        policy.identity_params(), pa[:, 0].shape))  # fmt: skip


def test_mixed_view_logits_equal_the_teacher_on_the_replayed_image(strong_cache):
    """Replay (partner decoded, its own params) == the stored view; the cached logits are
    the teacher's on the replayed mixed image (fp16 rounding)."""
    from kdcache.data import mix
    from kdcache.data.loader import ViewMaker
    from kdcache.models.factory import create_model

    ds = _dataset()
    with open_cache(strong_cache) as c:
        params, policy = c.view_params(), _policy(c)
        rows = np.arange(40).repeat(3)
        cached = c.read(rows, np.tile(np.arange(3), 40)).reshape(40, 3, -1)
        order = _order(c, ds)
    maker = ViewMaker(ds, policy, rows=order)
    model, _ = create_model("resnet8", num_classes=10, init_seed=0)
    model.eval()
    sd = policy.s_dim
    picked = [(i, a) for i in range(40) for a in (1, 2) if params[i, a, sd] > 0][:6]
    assert {int(params[i, a, sd]) for i, a in picked} == {1, 2}
    for i, a in picked:
        view = maker.replay(int(order[i]), params[i, a][None])[0][0]
        partner = int(params[i, a, sd + 2])
        lam = float(params[i, a, sd + 1])
        assert 0.0 < lam < 1.0 and 0 <= partner < 40
        mine = policy.view(
            ds.load(int(order[i])), np.r_[params[i, a, :sd], np.zeros(len(params[i, a]) - sd)]
        )
        theirs = policy._one(ds.load(int(order[partner])), params[i, a, sd + len(mix.MIX_FIELDS) :])
        want = mix.apply_mix(mine.numpy(), theirs, params[i, a, sd : sd + len(mix.MIX_FIELDS)])
        assert np.array_equal(view.numpy(), want)
        with torch.no_grad():
            logits = model(view[None].float().div(255.0))[0].numpy()
        np.testing.assert_allclose(cached[i, a], logits.astype(np.float16), rtol=2e-3, atol=2e-3)
    assert "ok" in cli("cache", "verify", strong_cache, "--replay").output


def test_stage2_trains_against_lambda_mixed_labels(strong_cache, tmp_path):
    from kdcache.distill.batches import BatchMaker
    from kdcache.distill.loop import mixed_targets
    from kdcache.distill.losses import get_loss
    from kdcache.distill.teachers import CachedTeacher, open_caches

    ds = _dataset()
    caches = open_caches([strong_cache], ds, 10, None)
    teacher = CachedTeacher(caches, "same", "mean-logits", 1 << 30)
    with open_cache(strong_cache) as c:
        policy, params = _policy(c), c.view_params()
        order = _order(c, ds)
    make = BatchMaker(ds, policy, teacher)
    samples, augs = np.arange(12), np.array([1, 2] * 6)
    b = make(samples, augs, epoch=0)
    labels = np.asarray(ds.labels)[order]  # of cache rows
    sd = policy.s_dim
    p = params[samples, augs]
    on = p[:, sd] > 0
    assert on.any()
    np.testing.assert_array_equal(b["mix_labels"].numpy()[on], labels[p[on, sd + 2].astype(int)])
    np.testing.assert_allclose(b["mix_lam"].numpy(), np.where(on, p[:, sd + 1], 1.0))
    s = torch.randn(12, 10)
    y = mixed_targets(b["labels"], b["mix_labels"], b["mix_lam"], 10)
    per = torch.nn.functional.cross_entropy(s, b["labels"], reduction="none")
    per2 = torch.nn.functional.cross_entropy(s, b["mix_labels"], reduction="none")
    want = (b["mix_lam"] * per + (1 - b["mix_lam"]) * per2).mean()
    assert torch.allclose(get_loss("ce")(s, None, y)["loss"], want, atol=1e-5)
    out = tmp_path / "run"
    cli("distill", "--cache", strong_cache, "--student", "resnet8", "--loss", "kd",
        "--max-samples", "40", "--epochs", "1", "--batch-size", "40", "--out", out)  # fmt: skip
    assert (out / "last.pt").exists()
    args = ["--max-samples", "40", "--epochs", "1", "--out", tmp_path / "r2"]
    res = cli("distill", "--cache", strong_cache, "--student", "resnet8", "--loss", "lsr", *args,
              ok=False)  # fmt: skip
    assert res.exit_code == 2 and "--loss lsr" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "r2").exists()


def _key(**kw) -> str:
    from kdcache.precompute.config import PrecomputeConfig
    from kdcache.precompute.setup import build_setup

    cfg = PrecomputeConfig(teacher="resnet8", out="x.zarr", dataset="digits", max_samples=20,
                           random_init=0, **kw)  # fmt: skip
    return build_setup(cfg).spec.key()


def test_spec_key_covers_every_policy_parameter():
    base = _key()
    assert base == _key(reprob=0.0, mixup=0.0, cutmix=0.0, color_jitter=None, remode="const")
    variants = [
        {"aa": "rand-m9-mstd0.5-inc1"}, {"aa": "rand-m7-mstd0.5-inc1"}, {"aa": "trivialaugment"},
        {"aa": "original"}, {"color_jitter": 0.4}, {"color_jitter": 0.3}, {"reprob": 0.25},
        {"reprob": 0.5}, {"reprob": 0.25, "remode": "const"}, {"reprob": 0.25, "recount": 2},
        {"mixup": 0.8}, {"mixup": 0.2}, {"cutmix": 1.0}, {"mixup": 0.8, "mixup_prob": 0.5},
        {"mixup": 0.8, "cutmix": 1.0}, {"mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.3},
        {"augment": "identity", "mixup": 0.8}, {"mixup": 0.8, "mixup_mode": "elem"},
    ]  # fmt: skip
    keys = [_key(**v) for v in variants]
    assert len(set(keys + [base])) == len(variants) + 1
    # as timm: color jitter is off under --aa, so it does not change the key there
    assert _key(aa="original", color_jitter=0.4) == keys[3]
    # switch prob only matters when both mixup and cutmix are on
    assert _key(mixup=0.8, mixup_switch_prob=0.3) == keys[10]


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--aa", "rand-m9-q3"], "--aa"),
        (["--aa", "augmix-m5"], "--aa"),
        (["--reprob", "1.5"], "--reprob"),
        (["--reprob", "0.2", "--remode", "noise"], "--remode"),
        (["--mixup", "-1"], "--mixup"),
        (["--mixup-prob", "2"], "--mixup-prob"),
    ],
)
def test_bad_options_one_line_exit_2_nothing_written(tmp_path, args, expect):
    out = tmp_path / "out.zarr"
    res = cli("precompute", *DIGITS, "--max-samples", "8", "--out", out, *args, ok=False)
    assert res.exit_code == 2, res.output
    last = res.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: ") and expect in last[0], res.output
    assert not out.exists()


def test_mixup_on_text_is_refused(tmp_path, make_text_file, tiny_bert_dir):
    out = tmp_path / "t.zarr"
    res = cli("precompute", "--teacher", f"hf:{tiny_bert_dir}", "--dataset", "text",
              "--data-root", make_text_file("jsonl", n=12), "--augment", "identity",
              "--mixup", "0.8", "--out", out, ok=False)  # fmt: skip
    assert res.exit_code == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --mixup") and "text" in last
    assert not out.exists()


def test_list_views_documents_every_op_and_info_shows_the_policy(strong_cache):
    from kdcache.data.augment import OPS

    rows = json.loads(cli("list", "views", "--json").output)
    aa = next(r for r in rows if r["name"] == "--aa")
    assert [o["name"] for o in aa["ops"]] == list(OPS) and all(o["replay"] for o in aa["ops"])
    names = {r["name"] for r in rows}
    assert {"--color-jitter", "--reprob", "--mixup/--cutmix"} <= names
    text = cli("cache", "info", strong_cache).output
    line = next(ln for ln in text.splitlines() if ln.startswith("augment"))
    assert "rand-m9-mstd0.5-inc1" in line and "p=0.5 pixel" in line and "cutmix 1.0" in line


def test_jpeg_folder_rrc_flip_with_mixup_replays(tmp_path):
    """Native-size JPEGs of different sizes: the partner's box is drawn on its own size;
    verify --replay re-decodes partners and proves the stored digests."""
    root = make_jpeg_folder(tmp_path / "imgs", per_class=3)  # root/train/<class>/*.jpg
    out = tmp_path / "j.zarr"
    cli("precompute", "--teacher", "resnet8", "--random-init", "0", "--dataset", "imagefolder",
        "--data-root", root, "--augment", "rrc-flip", "--image-size", "32",
        "--aa", "trivialaugment", "--color-jitter", "0.4", "--reprob", "1.0",
        "--cutmix", "1.0", "--mixup", "0.5", "--num-augs", "3", "--out", out)  # fmt: skip
    with open_cache(str(out)) as c:
        p, policy = c.view_params(), _policy(c)
        assert c.spec.views["params"]["strong"]["size"] == [32, 32]
    sd = policy.s_dim
    mixed = p[:, 1:][p[:, 1:, sd] > 0]
    assert len(mixed) and (mixed[:, sd + 7 + 2] > 0).all()  # the partner's own rrc box
    assert "ok" in cli("cache", "verify", out, "--replay", "--data-root", root).output
