"""Display units for the reporter. Pure module.

Records store bytes, seconds and joules (see docs/results-schema.md); this is the one
place that turns them into GiB, tokens/s, milliseconds and percentages for people. A
field's stored unit is the one ``harness.core.schema`` declares for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harness.core import schema

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


# How each unit the schema declares is shown.
_DISPLAY: dict[str, Unit] = {
    "tokens/s": Unit(1.0, "tokens/s", 0),
    "fraction": Unit(100.0, "%", 1),
    "bytes": Unit(1.0 / GIB, "GiB", 2),
    "J/token": Unit(1000.0, "mJ", 1),
    "J": Unit(1.0, "J", 0),
    "s/step": Unit(1000.0, "ms", 1),  # step times are tenths of a second to seconds: milliseconds read best
    "s": Unit(1.0, "s", 1),
}
_PLAIN = Unit(1.0, "", 3)


def unit_for(metric: str) -> Unit:
    """The display unit of a metric: from the unit the schema declares for it; for names
    outside the record (env.json facts, report columns such as ``memory_bytes``), from
    the unit at the end of the name."""
    declared = schema.get(metric)
    if declared is not None:
        return _DISPLAY.get(declared.unit or "", _PLAIN)
    if metric.endswith("_bytes"):
        return _DISPLAY["bytes"]
    if metric.endswith("_j"):
        return _DISPLAY["J/token"] if metric.endswith("per_token_j") else _DISPLAY["J"]
    if metric.endswith("_s"):
        return _DISPLAY["s/step"] if metric.startswith("step_time") else _DISPLAY["s"]
    return _DISPLAY["fraction"] if metric.endswith("_spread") else _PLAIN


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
