"""Loss library: values against independent numpy formulas, gradients, registry, helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kdcache.cache.errors import KdcacheError
from kdcache.distill.losses import (
    LOSSES,
    check_hparams,
    combine_teachers,
    get_loss,
    knowledge_adjust,
    loss_defaults,
    loss_hparams,
    loss_needs_cache,
    loss_needs_teacher,
    regularization_samples,
    teacher_view_mean,
)

S = np.array([[1.0, 2.0, 0.5], [0.2, -1.0, 3.0], [-0.5, 0.3, 0.1]])
TL = np.array([[2.0, 0.5, 1.0], [0.0, 0.3, 1.5], [1.2, -0.4, 0.9]])
Y = np.array([0, 2, 1])


def lsm(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -lsm(z)[np.arange(len(y)), y]


def np_kl_rows(p: np.ndarray, logp_s: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - logp_s)).sum(1)


def designed(y: np.ndarray, k: int, c: float) -> np.ndarray:
    q = np.full((len(y), k), (1 - c) / (k - 1))
    q[np.arange(len(y)), y] = c
    return q


def run(name: str, s=S, t=TL, y=Y, **hp) -> dict[str, torch.Tensor]:
    return run_leaf(name, s, t, y, **hp)[0]


def run_leaf(name: str, s=S, t=TL, y=Y, **hp) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Float64 call of a loss; also returns the student leaf for gradients."""
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    tt = None if t is None else torch.tensor(t, dtype=torch.float64)
    return get_loss(name, **hp)(st, tt, torch.tensor(y)), st


def val(out: dict[str, torch.Tensor], key: str = "loss") -> float:
    return float(out[key].detach())


def test_ce_value():
    assert val(run("ce", t=None)) == pytest.approx(np_ce(S, Y).mean(), rel=1e-12)


def test_kd_value_and_terms():
    T, alpha, w = 4.0, 0.9, 0.1
    kd = T * T * np_kl_rows(np.exp(lsm(TL / T)), lsm(S / T)).mean()
    out = run("kd")
    assert val(out, "kd") == pytest.approx(kd, rel=1e-10)
    assert val(out, "ce") == pytest.approx(np_ce(S, Y).mean(), rel=1e-12)
    assert val(out) == pytest.approx(w * np_ce(S, Y).mean() + alpha * kd, rel=1e-10)


def test_kd_identical_logits_is_zero_with_zero_gradient():
    s = torch.tensor(S, requires_grad=True)
    out = get_loss("kd", ce_weight=0.0)(s, s.detach().clone(), torch.tensor(Y))
    out["loss"].backward()
    assert abs(val(out)) < 1e-12
    assert torch.allclose(s.grad, torch.zeros_like(s), atol=1e-12)


def np_wsl_weight(s, t, y):
    return 1 - np.exp(-np_ce(s, y) / (np_ce(t, y) + 1e-7))


def test_wsl_value_and_terms():
    T, alpha = 4.0, 2.25
    w = np_wsl_weight(S, TL, Y)
    h = -(np.exp(lsm(TL / T)) * lsm(S / T)).sum(1)
    soft = T * T * (w * h).mean()
    out = run("wsl")
    assert val(out, "weight_mean") == pytest.approx(w.mean(), rel=1e-10)
    assert val(out, "soft") == pytest.approx(soft, rel=1e-10)
    assert val(out) == pytest.approx(np_ce(S, Y).mean() + alpha * soft, rel=1e-10)
    assert set(out) == {"loss", "ce", "soft", "weight_mean"}


def test_wsl_weight_carries_no_gradient():
    T, alpha = 4.0, 2.25
    s0, t, y = torch.tensor(S), torch.tensor(TL), torch.tensor(Y)
    w0 = torch.tensor(np_wsl_weight(S, TL, Y))  # frozen at s0

    def frozen_w(s: torch.Tensor) -> torch.Tensor:  # the loss with w treated as a constant
        h = -(F.softmax(t / T, 1) * F.log_softmax(s / T, 1)).sum(1)
        return F.cross_entropy(s, y) + alpha * T * T * (w0 * h).mean()

    s = s0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(frozen_w, (s,))  # the reference's own gradient is right
    wsl = get_loss("wsl")
    s.grad = None
    out = wsl(s, t, y)
    out["loss"].backward()
    s_ref = s0.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(frozen_w(s_ref), s_ref)
    assert val(out) == pytest.approx(float(frozen_w(s0)), rel=1e-12)
    assert torch.allclose(s.grad, g_ref, rtol=1e-10, atol=1e-12)
    # w does depend on s, so finite differences of the total disagree with the detached gradient
    total = lambda z: wsl(z, t, y)["loss"]  # noqa: E731
    assert not torch.autograd.gradcheck(
        total, (s0.clone().requires_grad_(True),), raise_exception=False
    )


def test_lsr_value_matches_numpy_and_torch():
    eps, k = 0.1, 3
    target = (1 - eps) * np.eye(k)[Y] + eps / k
    expected = -(target * lsm(S)).sum(1).mean()
    out = run("lsr", t=None)
    torch_ls = F.cross_entropy(torch.tensor(S), torch.tensor(Y), label_smoothing=eps)
    assert val(out) == pytest.approx(expected, rel=1e-12)
    assert val(out) == pytest.approx(float(torch_ls), rel=1e-12)


def test_lsr_os_at_T1_is_label_smoothing_minus_constant():
    # (1-a)CE + a KL(u||p) = (1-a)CE + a(CE(u,p) - log K) = LSR(eps=a) - a log K: same gradient
    a, k = 0.3, S.shape[1]
    os_ = run("lsr-os", t=None, T=1.0, alpha=a)
    ls = run("lsr", t=None, eps=a)
    assert val(os_) == pytest.approx(val(ls) - a * math.log(k), rel=1e-12)
    s1 = torch.tensor(S, requires_grad=True)
    s2 = torch.tensor(S, requires_grad=True)
    get_loss("lsr-os", T=1.0, alpha=a)(s1, None, torch.tensor(Y))["loss"].backward()
    get_loss("lsr", eps=a)(s2, None, torch.tensor(Y))["loss"].backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-12, atol=1e-14)


def test_lsr_os_tc_value_and_c_range():
    T, alpha, c, k = 4.0, 0.1, 0.5, 3
    soft = T * T * np_kl_rows(designed(Y, k, c), lsm(S / T)).mean()
    out = run("lsr-os-tc", t=None, c=c)
    assert val(out, "soft") == pytest.approx(soft, rel=1e-10)
    assert val(out) == pytest.approx((1 - alpha) * np_ce(S, Y).mean() + alpha * soft, rel=1e-10)
    uniform = run("lsr-os", t=None)
    soft_u = T * T * np_kl_rows(np.full((3, k), 1 / k), lsm(S / T)).mean()
    assert val(uniform, "soft") == pytest.approx(soft_u, rel=1e-10)
    with pytest.raises(ValueError, match=r"1/K"):
        run("lsr-os-tc", t=None, c=1 / 3)  # default c=0.2 with K=3 is invalid too
    with pytest.raises(ValueError, match="c="):
        run("lsr-os-tc", t=None)


def test_tfkd_reg_direct_formula():
    T, alpha, mult, cp = 20.0, 0.1, 100.0, 0.99
    n, k = S.shape
    p_d = designed(Y, k, cp)
    q = np.exp(p_d / T) / np.exp(p_d / T).sum(1, keepdims=True)
    soft = mult * (q * (np.log(q) - lsm(S))).sum() / (n * k)
    out = run("tfkd-reg", t=None)
    assert val(out, "soft") == pytest.approx(soft, rel=1e-10)
    assert val(out) == pytest.approx((1 - alpha) * np_ce(S, Y).mean() + alpha * soft, rel=1e-10)


def test_tfkd_self_value():
    T, alpha, mult = 6.0, 0.95, 50.0
    n, k = S.shape
    pt = np.exp(lsm(TL / T))
    kd = T * T * mult * (pt * (np.log(pt) - lsm(S / T))).sum() / (n * k)
    out = run("tfkd-self")
    assert val(out, "kd") == pytest.approx(kd, rel=1e-10)
    assert val(out) == pytest.approx((1 - alpha) * np_ce(S, Y).mean() + alpha * kd, rel=1e-10)


def test_mrkd_is_kd_on_given_logits():
    assert val(run("mrkd", M=3, interval=100, T=2.0, alpha=0.9, ce_weight=0.1)) == pytest.approx(
        val(run("kd", T=2.0))
    )
    assert loss_defaults("mrkd") == {
        "T": 4.0,
        "alpha": 0.3,
        "ce_weight": 1.0,
        "M": 2,
        "interval": None,
        "warmup": 0,
        "ka": True,
    }
    with pytest.raises(ValueError, match="M=0"):
        get_loss("mrkd", M=0)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown loss 'nope'.*kd.*wsl"):
        get_loss("nope")
    with pytest.raises(ValueError, match=r"'temp'.*accepted: T, alpha, ce_weight"):
        get_loss("kd", temp=4)
    for bad in ({"T": 0}, {"T": -1.0}, {"alpha": -0.1}, {"T": "4"}, {"T": True}, {"T": math.nan}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            get_loss("kd", **bad)
    with pytest.raises(ValueError, match="needs teacher"):
        get_loss("wsl")(torch.tensor(S), None, torch.tensor(Y))
    with pytest.raises(ValueError, match="labels"):
        get_loss("ce")(torch.tensor(S), None, torch.tensor(S[:, 0]))
    flags = {n: (loss_needs_teacher(n), loss_needs_cache(n)) for n in LOSSES}
    assert [n for n, f in flags.items() if f[0]] == ["kd", "wsl", "tfkd-self", "mrkd"]
    assert [n for n, f in flags.items() if f[1]] == ["kd", "wsl", "tfkd-self"]
    d = loss_defaults("kd")
    d["T"] = 99
    assert loss_defaults("kd")["T"] == 4.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_runs_finite_with_gradient(name):
    out, s = run_leaf(name, **({"c": 0.5} if name == "lsr-os-tc" else {}))
    loss = out["loss"]
    assert loss.ndim == 0 and loss.dtype == torch.float64
    assert torch.isfinite(loss) and loss.requires_grad
    assert "ce" in out and all(not v.requires_grad for k, v in out.items() if k != "loss")
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"wsl"}))
def test_gradcheck_float64(name):
    fn = get_loss(name, **({"c": 0.5} if name == "lsr-os-tc" else {}))
    t, y = torch.tensor(TL), torch.tensor(Y)
    s = torch.tensor(S, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: fn(z, t, y)["loss"], (s,))


def test_half_teacher_and_autocast_compute_in_float32():
    s, y = torch.tensor(S, dtype=torch.float32), torch.tensor(Y)
    fn = get_loss("wsl")
    ref = fn(s, torch.tensor(TL, dtype=torch.float32), y)["loss"]
    t16 = torch.tensor(TL, dtype=torch.float16)  # TL is exact in fp16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(s.to(torch.bfloat16), t16, y)["loss"]
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), rel=2e-2)
    assert float(fn(s, t16, y)["loss"]) == pytest.approx(float(ref), rel=1e-6)


def test_combine_teachers():
    a, b = torch.tensor(S), torch.tensor(TL)
    assert torch.allclose(combine_teachers([a, b]), (a + b) / 2)
    mp = combine_teachers([a, b], mode="mean-probs")
    assert torch.allclose(F.softmax(mp, 1), (F.softmax(a, 1) + F.softmax(b, 1)) / 2)
    # at T=1 the result is the log of a distribution
    assert torch.allclose(mp.exp().sum(1), torch.ones(3, dtype=torch.float64))
    mp2 = combine_teachers([a, b], mode="mean-probs", T=2.0)
    assert torch.allclose(F.softmax(mp2 / 2, 1), (F.softmax(a / 2, 1) + F.softmax(b / 2, 1)) / 2)
    assert combine_teachers([a.half()]).dtype == torch.float32
    with pytest.raises(ValueError, match="mode"):
        combine_teachers([a], mode="max")
    with pytest.raises(ValueError, match="shapes"):
        combine_teachers([a, b[:2]])
    with pytest.raises(ValueError, match="at least one"):
        combine_teachers([])


def test_teacher_view_mean():
    z = torch.arange(12, dtype=torch.float16).reshape(2, 3, 2)
    out = teacher_view_mean(z)
    assert out.dtype == torch.float32
    assert out.tolist() == [[2.0, 3.0], [8.0, 9.0]]
    with pytest.raises(ValueError, match="B, A, C"):
        teacher_view_mean(z[0])


def test_regularization_samples_hand_case():
    # K=2, T=1: b = 1 - p^t_y and a = p^s_y - 1, so |b| > |a| iff the student is surer than the
    # teacher. Sample 0: p^s = sigmoid(2) = .881 > p^t = .5 -> yes; sample 1: .5 < .953 -> no.
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([0, 0])
    assert regularization_samples(s, t, y, T=1.0) == {"count": 1, "fraction": 0.5, "n": 2}
    # T=4, where the T factor decides: sample 0 has p^s_y1 = .9 (a = -.1), p^s_yT = sqrt3/(1+sqrt3),
    # p^t_yT = .75, so b = 4(.634 - .75) + .1 = -.364 -> yes; sample 1: a = -.5, p^s_yT = .5,
    # p^t_yT = 2/3, b = 4(-1/6) + .5 = -1/6 -> no.
    s = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0]])
    t = torch.tensor([[4 * math.log(3.0), 0.0], [4 * math.log(2.0), 0.0]])
    assert regularization_samples(s, t, y, T=4.0) == {"count": 1, "fraction": 0.5, "n": 2}
    T = 4.0
    ps1 = np.exp(lsm(S))[np.arange(3), Y]
    psT, ptT = np.exp(lsm(S / T))[np.arange(3), Y], np.exp(lsm(TL / T))[np.arange(3), Y]
    a, b = ps1 - 1, T * (psT - ptT) - (ps1 - 1)
    count = int((np.abs(b) > np.abs(a)).sum())
    got = regularization_samples(torch.tensor(S), torch.tensor(TL), torch.tensor(Y), T=T)
    assert got == {"count": count, "fraction": count / 3, "n": 3}
    with pytest.raises(ValueError, match="T="):
        regularization_samples(s, t, y, T=0)


def test_knowledge_adjustment_on_a_hand_made_batch():
    z = torch.tensor([[1.0, 5.0, 2.0], [3.0, 1.0, 0.0], [0.0, 2.0, 7.0], [4.0, 4.5, 9.0]])
    y = torch.tensor([0, 0, 1, 2])
    out = knowledge_adjust(z, y)
    want = [[5.0, 1.0, 2.0], [3.0, 1.0, 0.0], [0.0, 7.0, 2.0], [4.0, 4.5, 9.0]]
    assert out.tolist() == want  # wrong rows: true and arg-max logits swapped; right rows kept
    assert (out.argmax(1) == y).all()
    assert z[0].tolist() == [1.0, 5.0, 2.0]  # the input is not modified


def _tiny_student():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))


def test_mrkd_teacher_schedule_and_adjusted_ensemble():
    from kdcache.distill.teachers import MrKDTeacher

    model = _tiny_student()
    labels = np.array([0, 1, 2, 0])
    x = torch.randn(4, 4)
    t = MrKDTeacher(2, None, warmup=1, labels=labels)
    for step in range(1, 10):
        t.maybe_snapshot(model, step)  # epoch mode: steps never take a copy
    t.end_epoch(model, 0)
    assert t.logits(np.arange(4), None, x) is None  # warm-up epoch: no copy, KD stays off
    t.end_epoch(model, 1)
    assert len(t.copies) == 1
    with torch.no_grad():
        model[1].bias += 1.0
    t.end_epoch(model, 2)
    t.end_epoch(model, 3)
    assert len(t.copies) == 2  # the last M copies only
    raw = [model(x) for _ in range(2)]
    got = t.logits(np.arange(4), None, x)
    want = torch.stack([knowledge_adjust(r, torch.as_tensor(labels)) for r in raw]).mean(0)
    assert torch.allclose(got, want) and (got.argmax(1) == torch.as_tensor(labels)).all()
    plain = MrKDTeacher(2, None, adjust=False)
    plain.end_epoch(model, 0)
    assert torch.allclose(plain.logits(np.arange(4), None, x), model(x))
    steps = MrKDTeacher(3, 2, labels=labels)
    for step in range(1, 6):
        steps.maybe_snapshot(model, step)
    assert len(steps.copies) == 2  # steps 2 and 4
    state = t.state()
    back = MrKDTeacher(2, None, labels=labels)
    back.load_state(model, state)
    assert back.epochs_done == 4 and len(back.copies) == 2
    with pytest.raises(KdcacheError, match="M=0"):
        MrKDTeacher(0)


def test_mrkd_copy_is_taken_at_the_true_epoch_boundary(tmp_path):
    """50 samples, batch 16: 4 steps per epoch, the last one partial. The copy must be the
    student after all 4 (N // batch = 3 was one step short), and epoch 0 must be plain CE."""
    import json

    from tests.clitools import cli

    out = tmp_path / "mrkd"
    cli(
        "distill", "--student", "resnet8", "--loss", "mrkd", "--dataset", "digits",
        "--max-samples", "50", "--batch-size", "16", "--epochs", "2", "--no-plots",
        "--schedule", "constant", "--out", out,
    )  # fmt: skip
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "teacher_train_acc" not in recs[0]  # no copy during epoch 0: KD off
    assert "teacher_train_acc" in recs[1] and recs[1]["step"] == 8
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["mrkd"]["epochs_done"] == 2 and len(ck["mrkd"]["copies"]) == 2
    last = ck["mrkd"]["copies"][-1]
    assert all(torch.equal(last[k], ck["model"][k]) for k in last)


def test_hparam_domains_are_checked_up_front():
    with pytest.raises(ValueError, match=r"c=0.05 .*\(0.1, 1\) for K=10"):
        check_hparams("lsr-os-tc", {"c": 0.05}, num_classes=10)
    assert check_hparams("lsr-os-tc", {"c": 0.3}, num_classes=10)["c"] == 0.3
    bad = [
        ("kd", {"T": 0}), ("kd", {"alpha": -1}), ("wsl", {"T": "x"}), ("lsr", {"eps": 1.5}),
        ("mrkd", {"warmup": -1}), ("mrkd", {"ka": 1}), ("mrkd", {"interval": 0}),
        ("tfkd-reg", {"correct_prob": 1.0}),
    ]  # fmt: skip
    for loss, hp in bad:
        with pytest.raises(ValueError, match=f"{next(iter(hp))}="):
            check_hparams(loss, hp)
    # a new hyper-parameter missing from the domain table: inferred from its default, no KeyError
    fn = lambda s, t, y, **h: {"loss": s.sum()}  # noqa: E731
    LOSSES["tmp-loss"] = LOSSES["ce"].__class__(fn, {"gamma": 0.5, "steps": 3}, False, False)
    try:
        assert check_hparams("tmp-loss", {"gamma": 2}) == {"gamma": 2.0, "steps": 3}
        with pytest.raises(ValueError, match="steps=0.5.*an integer"):
            check_hparams("tmp-loss", {"steps": 0.5})
        assert {h["name"]: h["domain"] for h in loss_hparams("tmp-loss")} == {
            "gamma": "a finite number",
            "steps": "an integer",
        }
    finally:
        del LOSSES["tmp-loss"]
    hp = {h["name"]: h for h in loss_hparams("lsr-os-tc")}
    assert hp["c"] == {"name": "c", "default": 0.2, "domain": "a number in (1/K, 1)"}
    assert all(loss_hparams(n) is not None for n in LOSSES)


def test_bad_hparam_is_one_error_line_before_out_exists(tmp_path):
    from tests.clitools import cli

    out = tmp_path / "never"
    res = cli(
        "distill", "--student", "resnet8", "--loss", "lsr-os-tc", "--hparam", "c=0.05",
        "--max-samples", "16", "--out", out, ok=False,
    )  # fmt: skip
    assert res.exit_code == 2 and not out.exists()
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "c=0.05" in lines[0]


def test_mrkd_with_a_cache_trains_on_the_cached_views(tmp_path):
    """Every loss of a study sees the same views: MrKD ignores the cached logits, not the views."""
    from kdcache.distill.config import DistillConfig
    from kdcache.distill.setup import build_run
    from kdcache.models.factory import create_model
    from kdcache.models.runtime import init_runtime

    from tests.clitools import cli

    torch.manual_seed(0)
    model, _ = create_model("resnet8", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cache = tmp_path / "c.zarr"
    cli(
        "precompute", "--teacher", "resnet8", "--weights", tmp_path / "w.pt", "--dataset",
        "digits", "--max-samples", "16", "--num-augs", "2", "--chunk-samples", "16", "--out", cache,
    )  # fmt: skip
    cfg = DistillConfig(
        student="resnet8", loss="mrkd", caches=[str(cache)], max_samples=16, test_split="none"
    )
    r = build_run(cfg, init_runtime("cpu"))
    assert r.teacher is not None and r.teacher.num_augs == 2  # the views come from the cache
    assert r.live_teacher is r.mrkd and r.mrkd.interval is None and r.mrkd.adjust
