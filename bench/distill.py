"""Stage-2 throughput: kdcache's loop (CE, cached, online KD) vs timm, in one run. Not a test.

Same student, same data, same batch plan. kdcache rows run the real training path
(`distill.setup.build_run`, `BatchMaker`, `epoch_batches` with `distill.train`'s prefetch depth
and pinning, in-RAM images on the GPU, `train_epoch` with its on-device metrics):
  CE only        plain training, no cache (`distill --loss ce`): the speed to match
  cache KD       `--loss wsl|kd --cache C`: replayed views + cached logits (in RAM)
  online KD      the same loss with the teacher in memory (`OnlineTeacher`) every step
The peers (bench/timm_loops.py) run on the same replayed view batches:
  plain CE       a minimal timm-style loop: normalize, forward, CE, backward, step; no metrics
  timm online    timm's own `LogitDistillationTask` (timm.task.distillation), teacher in memory
Goals: cache/CE >= 0.98, kdcache-CE/plain >= 0.98, and cache/online >= 0.97 x ideal, where
ideal = (student step + teacher forward) / student step, both timed alone on one pre-made
batch; "cache/timm online" compares with the peer's own online KD. Modes are interleaved epoch
by epoch `--repeats` times. On CPU ratios use "steady" rates, the median over full-batch steps
(robust to other jobs on a shared machine); on CUDA, where steps are queued asynchronously,
whole "epoch" rates (each ends in a device sync). Data: synthetic CIFAR-100-format images in a
temp dir, or `--imagefolder N` synthetic JPEGs with rrc-flip at `--image-size`; models randomly
initialised (every online teacher has the cached teacher's weights).

    .venv/bin/python bench/distill.py [--quick] [--teacher resnet34] [--student resnet18]
        [--loss wsl] [--n 1024] [--batch-size 64] [--num-augs 4] [--device auto] [--compile]
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

from kdcache.distill.config import DistillConfig  # noqa: E402
from kdcache.distill.feed import to_input  # noqa: E402
from kdcache.distill.loop import BatchMaker, epoch_batches, prefetch_depth, train_epoch  # noqa: E402
from kdcache.distill.progress import place_on_device  # noqa: E402
from kdcache.distill.recipe import Recipe  # noqa: E402
from kdcache.distill.setup import build_run, make_optimizer  # noqa: E402
from kdcache.distill.teachers import OnlineTeacher  # noqa: E402
from kdcache.models.factory import create_model  # noqa: E402
from kdcache.models.runtime import init_runtime  # noqa: E402
from kdcache.precompute.config import PrecomputeConfig  # noqa: E402
from kdcache.precompute.run import run as precompute  # noqa: E402

from bench.common import write_cifar100, write_jpegs  # noqa: E402
from bench.timm_loops import PeerMode  # noqa: E402

GOAL_CE, GOAL_PLAIN, GOAL_IDEAL = 0.98, 0.98, 0.97


class Mode:
    """One way of training: its own student, optimizer, batch maker and (live) teacher, set up
    as `distill.train` sets it up (in-RAM images on the GPU, channels_last, compile)."""

    def __init__(self, name: str, cfg: DistillConfig, rt, live=None) -> None:
        torch.manual_seed(cfg.seed)  # the same student initialisation in every mode
        r = build_run(cfg, rt)
        self.name, self.cfg, self.rt, self.live, self.r = name, cfg, rt, live, r
        self.cuda = rt.device.type == "cuda"
        self.model = r.model.to(rt.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
            place_on_device(r, rt.device)
        self.run = torch.compile(self.model) if cfg.compile else self.model
        self.opt = make_optimizer(cfg, self.model)
        self.make = BatchMaker(  # decoded sources: cfg.workers DataLoader processes, pinned
            r.train, r.policy, r.teacher, seed=cfg.seed, workers=cfg.workers, pin=self.cuda
        )
        self.epochs: list[float] = []  # samples/s of whole epochs
        self.steps: list[float] = []  # samples/s of single full-batch steps

    def epoch(self, epoch: int, max_steps: int | None = None) -> None:
        """One epoch as `distill.train` runs it; records its rate and its steps' rates."""
        c, rt = self.cfg, self.rt
        n = len(self.r.train)
        depth = prefetch_depth(rt.device, c.workers)
        batches = epoch_batches(
            self.make, n, c.batch_size, c.seed, epoch, c.views, depth, pin=self.cuda
        )
        marks: list[float] = []
        sums, _ = train_epoch(
            self.model,
            self.run,
            batches,
            self.r.loss_fn,
            self.opt,
            self.rt.device,
            teacher=self.live,
            amp=c.amp,
            reg_fn=self.r.reg_fn,
            on_step=lambda _: marks.append(time.perf_counter()),
            max_steps=max_steps,
            recipe=Recipe(),
            channels_last=self.cuda,
        )
        if max_steps is None:  # train_epoch ends in a host sync: its seconds are wall time
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
        self.run = torch.compile(self.model) if mode.cfg.compile else self.model
        self.opt = make_optimizer(mode.cfg, self.model)
        self.amp = mode.cfg.amp and self.dev.type == "cuda"
        bs = mode.cfg.batch_size
        b = mode.make(np.arange(bs), np.zeros(bs, np.int64), 0)
        self.x = to_input(b["views"], self.dev, self.dev.type == "cuda")
        self.y = b["labels"].to(self.dev)
        self.student: list[float] = []
        self.forward: list[float] = []
        self.measure(3)  # warm-up
        self.student.clear()
        self.forward.clear()

    def measure(self, reps: int) -> None:
        for _ in range(reps):
            sync(self.dev)
            t0 = time.perf_counter()
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self.run(self.x)
            loss = torch.nn.functional.cross_entropy(out.float(), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            sync(self.dev)
            self.student.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.teacher.logits(None, None, self.x)
            sync(self.dev)
            self.forward.append(time.perf_counter() - t0)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet34", help="timm, tv: or CIFAR-zoo name")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--loss", default="wsl", help="the distillation loss (wsl, kd, ...)")
    ap.add_argument("--n", type=int, default=1024, help="samples of the synthetic dataset")
    ap.add_argument("--num-augs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--imagefolder", action="store_true", help="synthetic JPEGs + rrc-flip")
    ap.add_argument("--image-size", type=int, default=224, help="rrc-flip output size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA")
    ap.add_argument("--compile", action="store_true", help="torch.compile students/teachers")
    ap.add_argument("--workers", type=int, default=0, help="distill --workers")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs of each mode")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip the timm rows")
    ap.add_argument("--quick", action="store_true", help="n=256, 1 repeat: smoke run")
    ap.add_argument("--e2e", action="store_true", help="whole commands, fresh processes (e2e.py)")
    return ap


def measure(args) -> dict:
    """Run every mode interleaved; returns rates (samples/s), the ideal ratio's parts and the
    precompute seconds. Used by main() and bench/gpu.py."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = init_runtime(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-distill-"))
    try:
        if args.imagefolder:
            write_jpegs(tmp / "data", args.n)
            data = dict(dataset="imagefolder", data_root=str(tmp / "data"))
            view = dict(augment="rrc-flip", image_size=args.image_size)
        else:
            write_cifar100(tmp / "data", args.n)
            data = dict(dataset="cifar100", data_root=str(tmp / "data"))
            view = {}
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
                num_augs=args.num_augs,
                batch_size=256,
                workers=args.workers,
                device=args.device,
                amp=args.amp,
                compile=args.compile,
                **data,
                **view,
            )
        )
        pre_s = time.perf_counter() - t0
        base = dict(
            student=args.student,
            test_split="none",
            batch_size=args.batch_size,
            schedule="constant",
            amp=args.amp,
            compile=args.compile,
            device=args.device,
            workers=args.workers,
            **data,
            **({"augment": "rrc-flip", "image_size": args.image_size} if view else {}),
        )
        online = OnlineTeacher(teacher, rt.device, amp=args.amp, compile=args.compile)
        kd = DistillConfig(loss=args.loss, caches=[cache], **base)
        ce = DistillConfig(loss="ce", **base)
        modes = [
            Mode("CE only", ce, rt),
            Mode(f"cache {args.loss}", kd, rt),
            Mode(f"online {args.loss}", kd, rt, live=online),
        ]
        if args.peers:
            t_copy, _ = create_model(args.teacher, num_classes=100, weights=str(tmp / "teacher.pt"))
            modes += [PeerMode("plain CE", ce, rt), PeerMode("timm online", ce, rt, t_copy)]
        for m in modes:
            m.epoch(0, max_steps=3)  # warm-up: allocator, kernels, compile, caches
        alone = Alone(modes[0], online)
        for rep in range(args.repeats):
            for m in modes:
                m.epoch(rep + 1)
            alone.measure(3)
        basis = "epoch" if rt.device.type == "cuda" else "steady"
        rates = {
            m.name: max(m.epochs) if basis == "epoch" else statistics.median(m.steps) for m in modes
        }
        return {
            "device": rt.device,
            "basis": basis,
            "modes": modes,
            "rates": rates,
            "t_student": statistics.median(alone.student),
            "t_teacher": statistics.median(alone.forward),
            "precompute_s": pre_s,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ratios(args, res: dict) -> list[tuple[str, float, float | None, str]]:
    """(name, value, goal, goal text) of the issue's ratios."""
    r = res["rates"]
    ce, cached, online = r["CE only"], r[f"cache {args.loss}"], r[f"online {args.loss}"]
    ideal = (res["t_student"] + res["t_teacher"]) / res["t_student"]
    rows = [
        ("cache / CE", cached / ce, GOAL_CE, f">= {GOAL_CE:.2f}"),
        ("ideal (s+t)/s", ideal, None, ""),
        ("cache / online", cached / online, GOAL_IDEAL * ideal, f">= {GOAL_IDEAL} x ideal"),
    ]
    if "plain CE" in r:
        rows.insert(1, ("kdcache CE / plain", ce / r["plain CE"], GOAL_PLAIN, f">= {GOAL_PLAIN}"))
        rows.append(("cache / timm online", cached / r["timm online"], None, "vs ideal"))
    return rows


def report(args, res: dict) -> None:
    modes, basis = res["modes"], res["basis"]
    print(
        f"{args.teacher} -> {args.student}, loss {args.loss}, "
        f"{'imagefolder JPEG rrc-flip@' + str(args.image_size) if args.imagefolder else 'cifar100'}"
        f"-format N={args.n} (A={args.num_augs} cached views, precompute "
        f"{res['precompute_s']:.1f} s), batch {args.batch_size}, device {res['device']}, "
        f"amp {args.amp}, compile {args.compile}, {torch.get_num_threads()} torch threads, "
        f"{args.repeats} interleaved epochs per mode; ratios on '{basis}' rates"
    )
    print("steady: median over full-batch steps; epoch: best whole epoch (incl. its first batch)")
    head = f"{'samples/s':<20} {'steady':>9} {'epoch':>9} {'steady/CE':>10} {'epoch/CE':>9}"
    print(head)
    print("-" * len(head))
    ce_s, ce_e = statistics.median(modes[0].steps), max(modes[0].epochs)
    for m in modes:
        s, e = statistics.median(m.steps), max(m.epochs)
        print(f"{m.name:<20} {s:>9,.1f} {e:>9,.1f} {s / ce_s:>10.3f} {e / ce_e:>9.3f}")
    bs = args.batch_size
    print(f"{'student step alone':<20} {bs / res['t_student']:>9,.1f}")
    print(f"{'teacher fwd alone':<20} {bs / res['t_teacher']:>9,.1f}")
    print()
    head = f"{'ratio (' + basis + ')':<20} {'value':>7}  {'goal':<16} {'target':>6}"
    print(head)
    print("-" * len(head))
    for name, value, goal, text in ratios(args, res):
        verdict = "" if goal is None else f"{goal:>6.3f} {'ok' if value >= goal else 'MISS'}"
        print(f"{name:<20} {value:>7.3f}  {text:<16} {verdict}")


def main() -> None:
    args = parser().parse_args()
    if args.e2e:
        from bench.e2e import run

        return run(args)
    if args.quick:
        args.n, args.repeats = min(args.n, 256), 1
    report(args, measure(args))


if __name__ == "__main__":
    main()
