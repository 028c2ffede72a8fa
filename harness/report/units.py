"""Display units for the reporter. Pure module.

Records store bytes, seconds and joules (see docs/results-schema.md); this is the one
place that turns them into GiB, tokens/s, milliseconds and percentages for people. A
metric's unit follows from its name (the schema puts units in names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1024 ** 3

# Card sizes people ask "will it fit on ...?" about, in GB as sold. The usable memory of
# these cards is within about 1% of the same number of GiB (a "24 GB" card reports
# 23.99 GiB), so the reference lines are drawn at N GiB.
CARD_SIZES_GB: tuple[int, ...] = (16, 24, 40, 48, 80)


@dataclass(frozen=True)
class Unit:
    """How one metric is shown: multiply the stored value by ``scale``, then add ``label``."""

    scale: float
    label: str
    digits: int

    def convert(self, value: Any) -> float | None:
        v = as_float(value)
        return None if v is None else v * self.scale

    def format(self, value: Any) -> str:
        v = self.convert(value)
        if v is None:
            return "-"
        if self.label == "tokens/s" or (abs(v) >= 1000 and self.digits <= 1):
            return f"{v:,.0f} {self.label}".strip()
        return f"{v:,.{self.digits}f} {self.label}".strip()


def as_float(value: Any) -> float | None:
    """A stored number as a finite float, or None (null, "nan", a non-number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def unit_for(metric: str) -> Unit:
    """The display unit of a metric, from the unit in its name."""
    if metric == "tokens_per_s":
        return Unit(1.0, "tokens/s", 0)
    if metric in ("mfu",) or metric.endswith("_spread"):
        return Unit(100.0, "%", 1)
    if metric.endswith("_bytes"):
        return Unit(1.0 / GIB, "GiB", 2)
    if metric.endswith("_j"):
        return Unit(1000.0, "mJ", 1) if metric.endswith("per_token_j") else Unit(1.0, "J", 0)
    if metric.endswith("_s"):
        # step times are tenths of a second to seconds: milliseconds read best
        return Unit(1000.0, "ms", 1) if metric.startswith("step_time") else Unit(1.0, "s", 1)
    return Unit(1.0, "", 3)


def fmt(metric: str, value: Any) -> str:
    """``fmt('peak_vram_bytes', 23336976384) == '21.73 GiB'``."""
    return unit_for(metric).format(value)


def fmt_change(rel: float | None, abs_change: float | None, metric: str) -> str:
    """A change as a signed percentage where it is defined, else in the metric's unit."""
    if rel is not None and math.isfinite(rel):
        return f"{rel * 100:+.1f}%"
    if abs_change is None:
        return "-"
    u = unit_for(metric)
    return f"{abs_change * u.scale:+,.{u.digits}f} {u.label}".strip()


def gib(value: Any) -> float | None:
    v = as_float(value)
    return None if v is None else v / GIB
