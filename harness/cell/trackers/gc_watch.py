"""Python's garbage collections during a cell's steps (worker side, stdlib only)."""

from __future__ import annotations

import gc
import time
from typing import Any


class GcWatch:
    """How many collections ran per generation while the block ran, and how long they
    took in all (``gc_pauses``). A full (generation 2) collection walks every tracked
    object; the worker freezes the libraries' objects first (``harness.cell.server``), so
    what remains is the cell's own. A tracker (``harness.cell.trackers.Trackers``)."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            g = int(info.get("generation", 0))
            self.counts[g] += 1
            self.seconds[g] += time.perf_counter() - self._t0

    def __enter__(self) -> "GcWatch":
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc) -> None:
        if self._cb in gc.callbacks:
            gc.callbacks.remove(self._cb)

    def fields(self) -> dict[str, Any]:
        return {"collections": list(self.counts), "seconds": [round(s, 6) for s in self.seconds]}

    def finish(self, out: dict[str, Any]) -> None:
        out["gc_pauses"] = self.fields()
