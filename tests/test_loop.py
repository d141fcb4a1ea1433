"""The training step itself: host syncs only at log points, exact on-device counts, uint8
inputs, gradient accumulation, warmup, clipping, EMA, label smoothing, device-clean views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kdcache.distill.loop import train_epoch
from kdcache.distill.recipe import (
    DeviceSums,
    ModelEma,
    Recipe,
    ce_weight,
    reg_count,
    with_label_smoothing,
)

CPU = torch.device("cpu")


def _batches(n_batches: int, bs: int, seed: int = 0, uint8: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        x = torch.randint(0, 256, (bs, 3, 4, 4), generator=g, dtype=torch.uint8)
        out.append(
            {
                "samples": np.arange(i * bs, (i + 1) * bs),
                "augs": np.zeros(bs, np.int64),
                "views": x if uint8 else x.float().div_(255.0),
                "labels": torch.randint(0, 5, (bs,), generator=g),
                "teacher": torch.randn(bs, 5, generator=g),
            }
        )
    return out


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))


def _kd():
    from kdcache.distill.losses import get_loss

    return get_loss("kd")


def _run(model, batches, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=kw.pop("lr", 0.1))
    hist: list = []
    sums, step = train_epoch(
        model, model, batches, _kd(), opt, CPU, history=hist, reg_fn=kw.pop("reg_fn", None), **kw
    )
    return sums, step, hist, opt


def test_no_host_sync_between_log_points(monkeypatch):
    """Every way a tensor reaches the host raises inside the step; only DeviceSums.pull (the
    log points) may sync: once per epoch by default, once per log interval + once at the end."""
    allowed = [False]
    pulls = []

    def guard(name):
        orig = getattr(torch.Tensor, name)

        def fn(self, *a, **k):
            if not allowed[0]:
                raise AssertionError(f"host sync ({name}) inside a training step")
            return orig(self, *a, **k)

        return fn

    for name in ("__float__", "__int__", "__bool__", "item", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    orig_pull = DeviceSums.pull

    def pull(self):
        pulls.append(1)
        allowed[0] = True
        try:
            return orig_pull(self)
        finally:
            allowed[0] = False

    monkeypatch.setattr(DeviceSums, "pull", pull)
    fn = lambda s, t, y: reg_count(s, t, y, T=4.0)  # noqa: E731

    def run(**kw):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return train_epoch(model, model, _batches(6, 8), _kd(), opt, CPU, reg_fn=fn, **kw)

    sums, _ = run()
    assert len(pulls) == 1 and sums["n"] == 48
    logged: list = []
    pulls.clear()
    run(log_every=2, on_log=lambda s, d: logged.append((s, d["n"])))
    assert logged == [(2, 16.0), (4, 32.0), (6, 48.0)] and len(pulls) == 4


def test_sums_are_exact_and_match_per_step_values():
    from kdcache.distill.losses import regularization_samples

    batches = _batches(5, 7)
    fn = lambda s, t, y: reg_count(s, t, y, T=4.0)  # noqa: E731
    sums, step, hist, _ = _run(_model(), batches, reg_fn=fn)
    assert step == 5 and sums["n"] == 35 and sums["n_teacher"] == 35
    assert sums["loss"] == pytest.approx(sum(h["loss"] * 7 for h in hist), rel=1e-6)
    # the on-device count equals the library's host count, sample for sample
    torch.manual_seed(0)
    s, t, y = torch.randn(64, 5), torch.randn(64, 5), torch.randint(0, 5, (64,))
    assert int(reg_count(s, t, y, 4.0)) == regularization_samples(s, t, y, T=4.0)["count"]
    assert sums["reg_count"] == int(sums["reg_count"])
    assert 0 <= sums["correct"] <= 35 and sums["correct"] == int(sums["correct"])


def test_device_sums_grow_with_late_terms():
    acc = DeviceSums(CPU)
    acc.add({"loss": torch.tensor(1.0), "ce": torch.tensor(2.0)})
    acc.add({"loss": torch.tensor(1.0), "ce": torch.tensor(2.0), "kd": torch.tensor(3.0)})
    acc.add({"loss": torch.tensor(1.0), "kd": torch.tensor(1.0)})
    assert acc.pull() == {"loss": 3.0, "ce": 4.0, "kd": 4.0}


def test_uint8_views_train_like_float_views():
    _, _, a, _ = _run(_model(), _batches(3, 8, uint8=True))
    _, _, b, _ = _run(_model(), _batches(3, 8, uint8=False))
    assert a == b  # scaled on the device, bit-identical to data.views.to_float


def test_accumulation_equals_the_big_batch():
    """Two micro-batches of 8 with accum 2 step like one batch of 16 (no BatchNorm here)."""
    small = _batches(4, 8)
    big = [
        {
            k: (np.concatenate if isinstance(v, np.ndarray) else torch.cat)([a[k], b[k]])
            for k, v in a.items()
        }
        for a, b in zip(small[::2], small[1::2], strict=True)
    ]
    m1, m2 = _model(), _model()
    _, s1, _, _ = _run(m1, small, recipe=Recipe(accum_steps=2))
    _, s2, _, _ = _run(m2, big)
    assert s1 == s2 == 2
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_warmup_scales_each_step_and_leaves_the_schedule_alone():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    seen = []
    orig = opt.step
    opt.step = lambda: (seen.append(opt.param_groups[0]["lr"]), orig())[1]
    train_epoch(model, model, _batches(5, 4), _kd(), opt, CPU, recipe=Recipe(warmup_steps=4))
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])
    assert opt.param_groups[0]["lr"] == 0.4


def test_clip_grad_bounds_the_norm():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    orig = opt.step

    def step():
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        norms.append(float(g.norm()))
        return orig()

    opt.step = step
    train_epoch(model, model, _batches(3, 8), _kd(), opt, CPU, recipe=Recipe(clip_grad=0.01))
    assert max(norms) <= 0.01 + 1e-6


def test_ema_follows_timm_warmup_decay():
    model = _model()
    ema = ModelEma(model, decay=0.9)
    w0 = ema.module[1].weight.clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    d = min(0.9, 2 / 11)
    torch.testing.assert_close(ema.module[1].weight, d * w0 + (1 - d) * model[1].weight)
    state = ema.state_dict()
    other = ModelEma(_model(1), decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.module[1].weight, ema.module[1].weight)


def test_label_smoothing_of_the_ce_term():
    from kdcache.distill.losses import get_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(16, 5), torch.randn(16, 5), torch.randint(0, 5, (16,))
    ce = with_label_smoothing(get_loss("ce"), 0.1, ce_weight("ce", {}))
    want = F.cross_entropy(s, y, label_smoothing=0.1)
    torch.testing.assert_close(ce(s, None, y)["loss"], want)
    hp = {"T": 4.0, "alpha": 0.9, "ce_weight": 0.1}
    kd = with_label_smoothing(get_loss("kd"), 0.1, ce_weight("kd", hp))
    out, plain = kd(s, t, y), get_loss("kd")(s, t, y)
    torch.testing.assert_close(out["loss"], 0.1 * want + 0.9 * plain["kd"])
    assert out["ce"] == plain["ce"]  # the logged CE stays unsmoothed


def test_views_replay_on_the_device_of_the_images():
    """crop-flip and identity (the batched in-RAM policies) build every index on the images'
    device (a CUDA run keeps the dataset there); the meta device fails on any stray CPU tensor.
    rrc-flip works per sample on the original image, in the loader's workers."""
    from kdcache.data.views import get_policy

    raw = torch.zeros(4, 3, 8, 8, dtype=torch.uint8, device="meta")
    for name, kw, p in (
        ("crop-flip", {}, [[1, 2, 1]] * 4),
        ("identity", {}, [[0]] * 4),
    ):
        out = get_policy(name, **kw).apply(raw, torch.tensor(p, dtype=torch.float32))
        assert out.device.type == "meta" and out.dtype == torch.float32


def test_inputs_and_eager_prefetch():
    """uint8 batches become float [0,1] (channels_last on request); the prefetch thread starts
    making batches before the first one is asked for (so evaluation overlaps it)."""
    import threading
    import time

    from kdcache.distill.feed import prefetch, to_input

    raw = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    x = to_input(raw, CPU, channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, raw.float() / 255.0, rtol=0, atol=0)
    made = threading.Event()

    def gen():
        made.set()
        yield from range(3)

    it = prefetch(gen(), depth=2)
    deadline = time.time() + 10
    while not made.is_set() and time.time() < deadline:
        time.sleep(0.01)
    assert made.is_set() and list(it) == [0, 1, 2]
    lazy = prefetch(iter(range(2)), depth=0)
    assert list(lazy) == [0, 1]
