"""The sweep's progress line, one per cell recorded (parent side; imports no torch):

    [3/12] gpu1 tiny-llama/bf16/s64/gc-off: ok, peak 1.2 GiB rss, 9,876 tokens/s (4.1 s; elapsed 12 s, ETA 37 s)

position (of the sweep's ``total``; just the count when the total is not known, as in a
fit search), the lane that ran the cell (under ``--gpus``), status, peak memory, tokens/s,
the cell's own time, the sweep's elapsed time and the ETA (the mean time of the cells
run so far, times the cells left, over the lanes running at once), then one indented
line for each thing to look at: scaling efficiency, an error, a non-finite loss, a GPU
pinning NVML contradicted.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from harness.core.fmt import fmt_duration, fmt_gib, fmt_rate, memory_of, status_text
from harness.core.record import Status


class Progress:
    def __init__(self, out: Callable[[str], None], total: int) -> None:
        self.out = out
        self.total = total  # <= 0: not known in advance
        self.t0 = time.monotonic()
        self.reported = 0
        self.ran = 0  # cells started in a worker (their times give the ETA)
        self.ran_time = 0.0
        self._lock = threading.Lock()

    def cell(self, rec: dict[str, Any], *, resumed: bool = False, elapsed: float | None = None,
             where: str | None = None, lanes: int = 1) -> None:
        """Report ``rec``: ``elapsed`` is the cell's own time, ``where`` the label of the
        lane that ran it, ``lanes`` how many lanes run cells at once."""
        with self._lock:
            self.reported += 1
            ran = bool(rec.get("log")) and not resumed
            if ran:
                self.ran += 1
                self.ran_time += float(rec.get("wall_time_s") or 0.0)
            self.out(self._line(rec, ran=ran, resumed=resumed, elapsed=elapsed, where=where, lanes=max(1, lanes)))

    def _line(self, rec: dict[str, Any], *, ran: bool, resumed: bool, elapsed: float | None, where: str | None,
              lanes: int) -> str:
        kind, mem = memory_of(rec)
        remaining = max(0, self.total - self.reported)
        eta = (self.ran_time / self.ran) * remaining / lanes if self.ran and self.total > 0 else None
        pos = f"{self.reported}/{self.total}" if self.total > 0 else f"{self.reported}"
        # a lane is named for a cell that ran on it, or whose launcher failed there
        lane = f"{where} " if where and not resumed and (ran or rec.get("status") == Status.CRASH.value) else ""
        what = "resumed" if resumed else fmt_duration(elapsed)
        tps = fmt_rate(rec.get("tokens_per_s")) if rec.get("status") == "ok" else "-"
        line = (f"[{pos}] {lane}{rec['cell_id']}: {status_text(rec)}, peak {fmt_gib(mem)} {kind}, "
                f"{tps} tokens/s ({what}; elapsed {fmt_duration(time.monotonic() - self.t0)}, "
                f"ETA {fmt_duration(eta)})")
        if rec.get("scaling_efficiency") is not None:
            line += f"\n    scaling efficiency {rec['scaling_efficiency']:.0%} vs {rec['scaling_baseline_cell']}"
        if rec.get("status") not in ("ok", "oom") and rec.get("error"):
            line += f"\n    {str(rec['error']).splitlines()[0][:300]}"
        if rec.get("nonfinite_message"):  # a NaN loss is never silent
            line += f"\n    {rec['nonfinite_message'][:300]}"
        if rec.get("gpu_pin_mismatch"):
            line += (f"\n    warning: pinned to {where} but NVML read GPU {rec.get('gpu_index')}: "
                     "memory figures of this cell may be another GPU's")
        return line
