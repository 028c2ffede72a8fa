"""The measured window's summary: step time, its spread, tokens/s. Pure module.

A record's ``step_time_s`` is the median of its measured steps (warm-up excluded) and
``tokens_per_s`` is ``tokens_per_step / step_time_s``; ``step_time_spread`` is
``(max - min) / median`` of the measured steps, how steady the window was.
"""

from __future__ import annotations

import statistics
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    s = sorted(values)
    if not s:
        raise ValueError("no values")
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(step_times: list[float], tokens_per_step: int) -> dict[str, Any]:
    if not step_times:
        return {"step_time_s": None, "step_time_p90_s": None, "step_time_spread": None, "tokens_per_s": None}
    med = statistics.median(step_times)
    return {
        "step_time_s": med,
        "step_time_p90_s": percentile(step_times, 90),
        # (max - min) / median of the measured steps: how steady the window was
        "step_time_spread": (max(step_times) - min(step_times)) / med if med > 0 else None,
        "tokens_per_s": tokens_per_step / med if med > 0 else None,
    }
