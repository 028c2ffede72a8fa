"""Step timing. A step is forward + backward + optimizer step + zero_grad for one batch.

Each step is timed on the host clock (``time.perf_counter``) between two device
synchronisations, so the figure is the device's real time for the step, queueing
included; warm-up steps are timed but excluded from the summary
(``harness.core.steps.summarize``).
"""

from __future__ import annotations

import time
from typing import Callable


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
