"""Stage-2 configuration: everything `cli.py distill` can set, in one dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kdcache.data.strongopts import StrongOptions

# the allowed interval of each float option ("(" / ")": open end, "[" / "]": closed end)
_RANGES = {
    "lr": "(0, inf)",
    "momentum": "[0, 1]",
    "weight_decay": "[0, inf)",
    "gamma": "(0, inf)",
    "memory_budget_gb": "[0, inf)",
    "warmup_epochs": "[0, inf)",
    "label_smoothing": "[0, 1)",
    "ema_decay": "(0, 1)",
    "clip_grad": "(0, inf)",
}


def _inside(v: float, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = v >= lo if interval[0] == "[" else v > lo
    below = v <= hi if interval[-1] == "]" else v < hi
    return above and below  # False for NaN


@dataclass
class DistillConfig(StrongOptions):
    """Options of a distill run; saved into every checkpoint so a run can be resumed."""

    student: str
    loss: str = "ce"
    caches: list[str] = field(default_factory=list)
    dataset: str = "digits"
    data_root: str | None = None
    split: str = "train"
    test_split: str = "test"
    download: bool = False
    num_classes: int | None = None
    pretrained: bool = False
    weights: str | None = None
    hparams: dict = field(default_factory=dict)
    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    schedule: str = "step"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    augment: str = "crop-flip"
    views: str = "one"
    teacher_view: str = "same"
    ensemble: str = "mean-logits"
    memory_budget_gb: float = 4.0
    image_size: int | None = None
    max_length: int = 128
    device: str = "auto"
    amp: bool = True  # bf16 autocast, CUDA only
    compile: bool = False
    workers: int = 0
    seed: int = 0
    out: str = "runs/distill"
    resume: bool = False
    overwrite: bool = False
    max_samples: int | None = None
    image_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    max_steps: int | None = None
    plots: bool = True
    log_every: int = 0  # optimizer steps between in-epoch log rows (0: once per epoch)
    eval_every: int = 1
    tensorboard: bool = False
    teacher: str | None = None  # online teacher (in memory)
    teacher_weights: str | None = None
    fill_missing: bool = False  # compute the chunks a --cache lacks with --teacher
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.9998
    accum_steps: int = 1
    storage_options: dict = field(default_factory=dict)
    # every CLI option as resolved (file, flags, defaults); written to the run's config.yaml
    cli_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (checkpoints carry their own config)."""
        return asdict(self)

    def validate(self) -> None:
        """Refuse out-of-range training options before anything is built, launched or written
        (the CLI's range types say the same for typed flags; this covers `study --set`, config
        files and the Python API)."""
        from kdcache.cache.errors import KdcacheError

        def bad(name: str, expected: str) -> KdcacheError:
            flag = "--" + name.replace("_", "-")
            v = getattr(self, name)
            shown = repr(v) if isinstance(v, str) else v
            return KdcacheError(f"{flag} {shown}: expected {expected}")

        choices = {
            "optimizer": ("sgd", "adamw"),
            "schedule": ("step", "cosine", "constant"),
            "teacher_view": ("same", "mean"),
            "ensemble": ("mean-logits", "mean-probs"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, "one of " + ", ".join(allowed))
        ints = {"epochs": 1, "batch_size": 1, "eval_every": 1, "log_every": 0, "accum_steps": 1,
                "workers": 0, "num_classes": 1, "max_samples": 1, "max_steps": 1}  # fmt: skip
        for name, lo in ints.items():
            v = getattr(self, name)
            if v is None and name in ("num_classes", "max_samples", "max_steps"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad(name, f"an integer >= {lo}")
        for name, interval in _RANGES.items():
            v = getattr(self, name)
            if v is None and name == "clip_grad":
                continue
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not (number and _inside(float(v), interval)):
                raise bad(name, f"a number in {interval}")
        if not all(isinstance(m, int) and m >= 1 for m in self.milestones):
            raise bad("milestones", "epochs >= 1, comma-separated")
