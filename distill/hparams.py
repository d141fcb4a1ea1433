"""The domain of every loss hyper-parameter, checked before a run creates anything.

One table maps a hyper-parameter name to its domain (a check and the words that say what is
expected); a loss may narrow a name for itself (``lsr-os-tc``'s ``c`` must exceed 1/K, which
needs the class count). A name missing from the table still gets a domain, inferred from the
type of its default, so registering a loss with a new hyper-parameter never breaks validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any


def is_real(v: Any) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Domain:
    """Where a value may lie: ``check(value, K)`` (K = classes, None when unknown) and text."""

    check: Callable[[Any, int | None], bool]
    text: str  # what is expected, e.g. "a number > 0"
    text_k: Callable[[int], str] | None = None  # the text once K is known

    def expected(self, k: int | None = None) -> str:
        return self.text_k(k) if (k is not None and self.text_k is not None) else self.text


def _c_check(v: Any, k: int | None) -> bool:
    return is_real(v) and (1.0 / k if k else 0.0) < v < 1.0


DOMAINS: dict[str, Domain] = {
    "T": Domain(lambda v, k: is_real(v) and v > 0, "a number > 0"),
    "alpha": Domain(lambda v, k: is_real(v) and v >= 0, "a number >= 0"),
    "ce_weight": Domain(lambda v, k: is_real(v) and v >= 0, "a number >= 0"),
    "multiplier": Domain(lambda v, k: is_real(v) and v >= 0, "a number >= 0"),
    "eps": Domain(lambda v, k: is_real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "correct_prob": Domain(lambda v, k: is_real(v) and 0 < v < 1, "a number in (0, 1)"),
    "c": Domain(
        _c_check,
        "a number in (1/K, 1)",
        lambda k: f"a number in (1/K, 1) = ({1.0 / k:.4g}, 1) for K={k}",
    ),
    "M": Domain(lambda v, k: is_int(v) and v >= 1, "an integer >= 1"),
    "interval": Domain(
        lambda v, k: v is None or (is_int(v) and v >= 1),
        "null (refresh at every epoch end) or an integer >= 1 (steps)",
    ),
    "warmup": Domain(lambda v, k: is_int(v) and v >= 0, "an integer >= 0 (epochs)"),
    "ka": Domain(lambda v, k: isinstance(v, bool), "true or false"),
}

# Names kept as given (not converted to float) when a loss is bound.
NON_FLOAT = {"M", "interval", "warmup", "ka"}


def domain_of(name: str, default: Any) -> Domain:
    """The table's domain, or one inferred from the default's type for an unlisted name."""
    if name in DOMAINS:
        return DOMAINS[name]
    if isinstance(default, bool):
        return Domain(lambda v, k: isinstance(v, bool), "true or false")
    if is_int(default):
        return Domain(lambda v, k: is_int(v), "an integer")
    if is_real(default):
        return Domain(lambda v, k: is_real(v), "a finite number")
    if isinstance(default, str):
        return Domain(lambda v, k: isinstance(v, str), "a string")
    return Domain(lambda v, k: True, "any value")


def check_values(
    loss: str, defaults: dict[str, Any], given: dict[str, Any], num_classes: int | None = None
) -> dict[str, Any]:
    """Defaults overlaid with the given values, every one checked against its domain.

    Raises ValueError naming the loss, the bad name=value and what is expected.
    """
    bad = sorted(set(given) - set(defaults))
    if bad:
        accepted = ", ".join(sorted(defaults)) or "none"
        raise ValueError(f"loss {loss!r}: unknown hyper-parameter {bad[0]!r}; accepted: {accepted}")
    hp = {**defaults, **given}
    for key, value in hp.items():
        dom = domain_of(key, defaults[key])
        if not dom.check(value, num_classes):
            where = "default" if key not in given else "--hparam"
            raise ValueError(
                f"loss {loss!r}: {key}={value!r} ({where}) is out of range; "
                f"expected {dom.expected(num_classes)}"
            )
    return {k: float(v) if is_real(v) and k not in NON_FLOAT else v for k, v in hp.items()}
