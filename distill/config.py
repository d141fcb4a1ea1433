"""Stage-2 configuration: everything `cli.py distill` can set, in one dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DistillConfig:
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
