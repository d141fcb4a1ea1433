"""The strong-augmentation options (timm train.py names) of both stages' configs, one copy:
`PrecomputeConfig` and `DistillConfig` inherit them. No torch here (configs import it)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(kw_only=True)
class StrongOptions:
    """--aa/--color-jitter/--reprob/--mixup/...; None/defaults: off (data/strong.py)."""

    aa: str | None = None
    color_jitter: float | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str | None = None  # pair (cache default) | elem (data/pairs.py)

    def strong(self) -> dict:
        """The options as ``data.strong.resolve_strong`` takes them."""
        d = {f.name: getattr(self, f.name) for f in fields(StrongOptions)}
        d["switch_prob"] = d.pop("mixup_switch_prob")
        return d

    def strong_given(self) -> list[str]:
        """The options set away from their defaults (as CLI flags)."""
        return ["--" + f.name.replace("_", "-") for f in fields(StrongOptions)
                if getattr(self, f.name) != f.default]  # fmt: skip
