"""Strong augmentation without a cache (online KD, plain CE): fresh seeded views each epoch,
the online teacher sees the very (mixed) image the student sees, CE on λ-mixed labels; the
options are refused next to a cache (it replays its own policy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.clitools import cli

STRONG = ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.5", "--mixup", "0.8", "--cutmix", "1.0"]
TRAIN = ["--dataset", "digits", "--student", "resnet8", "--max-samples", "40", "--epochs", "1",
         "--batch-size", "20", "--device", "cpu", "--no-plots"]  # fmt: skip


def _run(**kw):
    from kdcache.distill.config import DistillConfig
    from kdcache.distill.setup import build_run
    from kdcache.models.runtime import init_runtime

    cfg = DistillConfig(student="resnet8", dataset="digits", max_samples=40,
                        aa="rand-m9-mstd0.5-inc1", reprob=0.5, mixup=0.8, cutmix=1.0,
                        **kw)  # fmt: skip
    return cfg, build_run(cfg, init_runtime("cpu"))


def test_fresh_seeded_mixed_views_each_epoch():
    from kdcache.data.loader import ViewMaker
    from kdcache.distill.batches import BatchMaker

    cfg, r = _run(seed=3)
    assert r.policy.mixes and r.teacher is None
    make = BatchMaker(r.train, r.policy, None, seed=3)
    samples, augs = np.arange(16), np.zeros(16, np.int64)
    b0, again, b1 = make(samples, augs, 0), make(samples, augs, 0), make(samples, augs, 1)
    assert torch.equal(b0["views"], again["views"])  # a function of (seed, epoch, sample)
    assert not torch.equal(b0["views"], b1["views"])  # a fresh draw next epoch
    maker = ViewMaker(r.train, r.policy, rows=np.arange(len(r.train)))
    labels = np.asarray(r.train.labels)
    lam = b0["mix_lam"].numpy()
    assert (lam < 1).any()
    for i in range(16):  # the view, partner label and λ of a sample drawn alone
        views, params = maker.draw(i, 3 * 100_003 + 0, 1, False)
        assert torch.equal(b0["views"][i], torch.as_tensor(views[0]))
        rows, lam_i = r.policy.mix_of(params)
        assert lam[i] == lam_i[0]
        if rows[0] >= 0:
            assert b0["mix_labels"][i] == labels[rows[0]]


def test_online_teacher_sees_the_students_mixed_image(tmp_path, monkeypatch):
    import kdcache.distill.loop as loop
    from kdcache.distill.teachers import OnlineTeacher

    seen: dict[str, list] = {"student": [], "teacher": [], "targets": []}
    fwd, tlog, mixed = loop.forward, OnlineTeacher.logits, loop.mixed_targets

    def student(model, x):
        if model.training:
            seen["student"].append(x.detach().clone())
        return fwd(model, x)

    def teacher(self, samples, augs, views):
        seen["teacher"].append(views.detach().clone())
        return tlog(self, samples, augs, views)

    def targets(*a):
        seen["targets"].append(mixed(*a))
        return seen["targets"][-1]

    monkeypatch.setattr(loop, "forward", student)
    monkeypatch.setattr(OnlineTeacher, "logits", teacher)
    monkeypatch.setattr(loop, "mixed_targets", targets)
    out = tmp_path / "online"
    cli("distill", *TRAIN, "--loss", "kd", "--teacher", "resnet8", *STRONG, "--out", out)
    assert len(seen["student"]) == 2 == len(seen["teacher"])
    for s, t in zip(seen["student"], seen["teacher"], strict=True):
        assert torch.equal(s, t)
    y = torch.cat(seen["targets"])  # λ-mixed one-hot targets: rows sum to 1, some are split
    assert y.shape == (40, 10) and torch.allclose(y.sum(1), torch.ones(40))
    assert ((y > 0).sum(1) == 2).any()
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "teacher_train_acc" in rec


def test_strong_options_refused_with_a_cache(tmp_path):
    cache = tmp_path / "c.zarr"
    cli("precompute", "--dataset", "digits", "--teacher", "resnet8", "--random-init", "0",
        "--max-samples", "40", "--num-augs", "2", "--out", cache)  # fmt: skip
    out = tmp_path / "run"
    res = cli("distill", *TRAIN, "--cache", cache, "--loss", "kd", "--aa", "trivialaugment",
              "--out", out, ok=False)  # fmt: skip
    last = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(last) == 1 and last[0].startswith("error: --aa with --cache")
    assert not out.exists()
    res = cli("distill", *TRAIN, "--reprob", "1.5", "--out", out, ok=False)
    last = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(last) == 1 and "--reprob" in last[0]
    assert not out.exists()
    res = cli("distill", *TRAIN, "--loss", "lsr", "--mixup", "0.8", "--out", out, ok=False)
    assert res.exit_code == 2 and "--loss lsr" in res.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_study_plans_online_kd_only_with_a_teacher(tmp_path):
    from kdcache.cache.errors import KdcacheError
    from kdcache.distill.study import StudySpec, plan

    with pytest.raises(KdcacheError, match="needs teacher logits"):
        plan(StudySpec(str(tmp_path), ["kd"], [0, 1]))
    runs = plan(StudySpec(str(tmp_path), ["kd"], [0, 1], distill={"teacher": "resnet8"}))
    assert [r.seed for r in runs] == [0, 1] and runs[0].loss == "kd"


def test_views_report_rows_and_figure(tmp_path):
    from kdcache.distill import science_views as sv
    from kdcache.distill.study_stats import write_report

    rows = [{"student": "resnet8", "variant": v, "loss": "kd", "seed": s, "test_acc": acc + s / 100}
            for v, acc in (("kd, 1 view", 0.7), ("kd, 4 views", 0.8), (sv.ONLINE, 0.85))
            for s in range(3)]  # fmt: skip
    rep = write_report(rows, tmp_path, "views", sv.ONLINE, [])
    diffs = {c["a"]: c["mean_diff"] for c in rep["comparisons"]}
    assert diffs == pytest.approx({"kd, 1 view": -0.15, "kd, 4 views": -0.05})
    sv.plot(rep["summary"], rows, {1: 1000, 4: 4000}, tmp_path / "fig" / "v.png")
    assert (tmp_path / "fig" / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a").write_bytes(b"x" * 10)
    (tmp_path / "c" / "b").write_bytes(b"x" * 5)
    assert sv.nbytes(str(tmp_path / "c")) == 15
