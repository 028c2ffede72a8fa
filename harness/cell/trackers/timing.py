"""Step timing. A step is forward + backward + optimizer step + zero_grad for one batch.

Each step is timed on the host clock (``time.perf_counter``) between two device
synchronisations, so the figure is the device's real time for the step, queueing
included; warm-up steps are timed but excluded from the summary. ``tokens_per_s`` is
``tokens_per_step / median(step_time_s)``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    s = sorted(values)
    if not s:
        raise ValueError("no values")
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class StepTimer:
    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self.times: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        return dt


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
