"""Stage-2 throughput: CE-only vs distillation from the cache vs online KD, in one run. Not a test.

Same student, same data, same batch plan, the real training path (`distill.setup.build_run`,
`BatchMaker`, `epoch_batches` with `distill.train`'s prefetch depth, `train_epoch`):
  CE only        plain training, no cache (`distill --loss ce`): the speed to match
  cache KD       `--loss wsl|kd --cache C`: replayed views + cached logits (in RAM)
  online KD      the same loss with the teacher in memory (`OnlineTeacher`) run on the replayed
                 views every step: what the cache saves
Goals: cache/CE >= 0.97, and cache/online >= 0.95 x ideal, where ideal = (student step + teacher
forward) / student step, both timed alone on one pre-made batch. Modes are interleaved epoch by
epoch `--repeats` times; ratios use "steady" rates, the median over all full-batch steps
(robust to other jobs on a shared machine; a step = view replay + logits + train step + metrics).
"epoch" is the best whole epoch. Data: synthetic CIFAR-100-format images in a temp dir; models
randomly initialised (the online teacher has the cached teacher's weights).

    .venv/bin/python bench/distill.py [--quick] [--teacher resnet34] [--student resnet18]
        [--loss wsl] [--n 1024] [--batch-size 64] [--num-augs 4] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_cifar100  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.loop import BatchMaker, epoch_batches, prefetch_depth, train_epoch  # noqa: E402
from distill.setup import build_run, make_optimizer  # noqa: E402
from distill.teachers import OnlineTeacher  # noqa: E402
from models.factory import create_model  # noqa: E402
from models.runtime import init_runtime  # noqa: E402
from precompute.config import PrecomputeConfig  # noqa: E402
from precompute.run import run as precompute  # noqa: E402

GOAL_CE, GOAL_IDEAL = 0.97, 0.95


class Mode:
    """One way of training: its own student, optimizer, batch maker and (live) teacher."""

    def __init__(self, name: str, cfg: DistillConfig, rt, live=None) -> None:
        torch.manual_seed(cfg.seed)  # the same student initialisation in every mode
        r = build_run(cfg, rt)
        self.name, self.cfg, self.rt, self.live, self.r = name, cfg, rt, live, r
        self.model = r.model.to(rt.device)
        if rt.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(cfg, self.model)
        self.make = BatchMaker(r.train, r.policy, r.teacher, seed=cfg.seed)
        self.epochs: list[float] = []  # samples/s of whole epochs
        self.steps: list[float] = []  # samples/s of single full-batch steps

    def epoch(self, epoch: int, max_steps: int | None = None) -> None:
        """One epoch as `distill.train` runs it; records its rate and its steps' rates."""
        c, rt = self.cfg, self.rt
        n = len(self.r.train)
        depth = prefetch_depth(rt.device, c.workers)
        batches = epoch_batches(self.make, n, c.batch_size, c.seed, epoch, c.views, depth=depth)
        marks: list[float] = []
        sums, _ = train_epoch(
            self.model,
            self.model,
            batches,
            self.r.loss_fn,
            self.opt,
            self.rt.device,
            teacher=self.live,
            amp=c.amp,
            reg_fn=self.r.reg_fn,
            on_step=lambda _: marks.append(time.perf_counter()),
            max_steps=max_steps,
        )
        if max_steps is None:
            self.epochs.append(sums["n"] / sums["seconds"])
            full = n // c.batch_size  # steps 1..full-1: full batches, prefetch under way
            self.steps += [c.batch_size / (marks[i] - marks[i - 1]) for i in range(1, full)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Alone:
    """A student train step and a teacher forward, each timed alone on one pre-made batch (no
    data pipeline): the ideal ratio's parts. Measured between the modes' epochs."""

    def __init__(self, mode: Mode, teacher) -> None:
        self.dev, self.teacher = mode.rt.device, teacher
        self.model = copy.deepcopy(mode.model).train()
        self.opt = make_optimizer(mode.cfg, self.model)
        self.amp = mode.cfg.amp and self.dev.type == "cuda"
        bs = mode.cfg.batch_size
        b = mode.make(np.arange(bs), np.zeros(bs, np.int64), 0)
        self.x, self.y = b["views"].to(self.dev), b["labels"].to(self.dev)
        if self.dev.type == "cuda":
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.student: list[float] = []
        self.forward: list[float] = []
        self.measure(2)  # warm-up
        self.student.clear()
        self.forward.clear()

    def measure(self, reps: int) -> None:
        for _ in range(reps):
            t0 = time.perf_counter()
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self.model(self.x)
            loss = torch.nn.functional.cross_entropy(out.float(), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            float(loss.detach())
            sync(self.dev)
            self.student.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.teacher.logits(None, None, self.x).cpu()
            sync(self.dev)
            self.forward.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet34", help="timm, tv: or CIFAR-zoo name")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--loss", default="wsl", help="the distillation loss (wsl, kd, ...)")
    ap.add_argument("--n", type=int, default=1024, help="samples of the synthetic dataset")
    ap.add_argument("--num-augs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs of each mode")
    ap.add_argument("--quick", action="store_true", help="n=256, 1 repeat: smoke run")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = min(args.n, 256), 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = init_runtime(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-distill-"))
    try:
        write_cifar100(tmp / "data", args.n)
        torch.manual_seed(1)
        teacher, _ = create_model(args.teacher, num_classes=100)
        torch.save(teacher.state_dict(), tmp / "teacher.pt")
        t0 = time.perf_counter()
        cache = str(tmp / "teacher.zarr")
        precompute(
            PrecomputeConfig(
                teacher=args.teacher,
                weights=str(tmp / "teacher.pt"),
                out=cache,
                dataset="cifar100",
                data_root=str(tmp / "data"),
                num_augs=args.num_augs,
                batch_size=256,
                device=args.device,
                amp=args.amp,
            )
        )
        pre_s = time.perf_counter() - t0
        base = dict(
            student=args.student,
            dataset="cifar100",
            data_root=str(tmp / "data"),
            test_split="none",
            batch_size=args.batch_size,
            schedule="constant",
            amp=args.amp,
            device=args.device,
        )
        online = OnlineTeacher(teacher, rt.device)
        if rt.device.type == "cuda":
            online.model.to(memory_format=torch.channels_last)
        kd = DistillConfig(loss=args.loss, caches=[cache], **base)
        modes = [
            Mode("CE only", DistillConfig(loss="ce", **base), rt),
            Mode(f"cache {args.loss}", kd, rt),
            Mode(f"online {args.loss}", kd, rt, live=online),
        ]
        for m in modes:
            m.epoch(0, max_steps=3)  # warm-up: allocator, kernels, caches
        alone = Alone(modes[0], online)
        for rep in range(args.repeats):
            for m in modes:
                m.epoch(rep + 1)
            alone.measure(3)
        t_student, t_teacher = statistics.median(alone.student), statistics.median(alone.forward)
        report(args, rt.device, modes, t_student, t_teacher, pre_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args, device, modes, t_student: float, t_teacher: float, pre_s: float) -> None:
    steady = [statistics.median(m.steps) for m in modes]
    epoch = [max(m.epochs) for m in modes]
    ce, cached, online = steady
    ideal = (t_student + t_teacher) / t_student
    print(
        f"{args.teacher} -> {args.student}, loss {args.loss}, cifar100-format N={args.n} "
        f"(A={args.num_augs} cached views, precompute {pre_s:.1f} s), batch {args.batch_size}, "
        f"device {device}, {torch.get_num_threads()} torch threads, "
        f"{args.repeats} interleaved epochs per mode"
    )
    print("steady: median over full-batch steps; epoch: best whole epoch (incl. its first batch)")
    head = f"{'samples/s':<20} {'steady':>9} {'epoch':>9} {'steady/CE':>10} {'epoch/CE':>9}"
    print(head)
    print("-" * len(head))
    for m, s, e in zip(modes, steady, epoch, strict=True):
        print(f"{m.name:<20} {s:>9,.1f} {e:>9,.1f} {s / ce:>10.3f} {e / epoch[0]:>9.3f}")
    bs = args.batch_size
    print(f"{'student step alone':<20} {bs / t_student:>9,.1f}")
    print(f"{'teacher fwd alone':<20} {bs / t_teacher:>9,.1f}")
    print()
    rows = (
        ("cache / CE", cached / ce, GOAL_CE, f">= {GOAL_CE:.2f}"),
        ("ideal (s+t)/s", ideal, None, ""),
        ("cache / online", cached / online, GOAL_IDEAL * ideal, f">= {GOAL_IDEAL} x ideal"),
    )
    head = f"{'ratio (steady)':<16} {'value':>7}  {'goal':<16} {'target':>6}"
    print(head)
    print("-" * len(head))
    for name, value, goal, text in rows:
        verdict = "" if goal is None else f"{goal:>6.3f} {'ok' if value >= goal else 'MISS'}"
        print(f"{name:<16} {value:>7.3f}  {text:<16} {verdict}")


if __name__ == "__main__":
    main()
