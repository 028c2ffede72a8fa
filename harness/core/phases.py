"""The phase timers of a cell and the figures derived from them (the adaptive measured
window is ``harness.core.window``). Pure module (no torch, no I/O).

**Phase timers** (``PhaseClock`` in the worker, ``attach_timers`` in the parent). A cell's
wall time is cut into consecutive phases on one clock (``time.monotonic``, which on Linux
is the same system-wide clock in the parent and in the worker):

    submitted -> spawn -> imports -> checkpoint_write -> device_init -> model_load
    -> lora_wrap -> data_prep -> warmup -> measured -> verify -> teardown -> exit seen

so the parts add up to ``wall_time_s`` (``phase_unaccounted_s`` is what is left, ~0).
``fixed_cost_s = wall_time_s - phase_warmup_s - phase_measured_s``. docs/results-schema.md
says what each phase covers.

The worker cannot see the ends of its own timeline (the parent sent the job and sees the
process end), so it hands its absolute clock readings to the parent in one sub-dict of
its result, ``result[TIMELINE]`` (see ``TIMELINE``); the launcher that ran the cell turns
them into the spawn / imports / teardown phases and removes the sub-dict, so no record
carries it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable


# The worker's clock readings for the parent, a sub-dict of a cell's result
# (``time.monotonic`` seconds):
#   child_start: the job's first line in the new process (harness.cell.server),
#   cell_start:  the entry of ``run_cell`` (the phase clock's start),
#   body_end:    the cell's work done, before the trackers stop and the process exits.
# A launcher consumes it (``attach_timers``); records never carry it.
TIMELINE = "_timeline"


def process_started_at() -> float:
    """This process's start on the ``time.monotonic`` clock (what ``--time-limit`` counts
    from: the matrix sweep and the fit search share it); now if psutil cannot say."""
    try:
        import psutil

        return time.monotonic() - max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - the limit then counts from this call
        return time.monotonic()


# Record fields of the phases, in timeline order (each in seconds).
PHASES: tuple[str, ...] = ("spawn", "imports", "checkpoint_write", "device_init", "model_load", "lora_wrap",
                           "data_prep", "warmup", "measured", "verify", "teardown")
WORKER_PHASES: tuple[str, ...] = PHASES[1:-1]  # measured inside the worker process


def phase_field(name: str) -> str:
    return f"phase_{name}_s"


# -- phase timers ----------------------------------------------------------------------

class PhaseClock:
    """Consecutive phases of the worker's timeline: ``begin(name)`` closes the phase in
    progress (its time is added to its name; a name may recur) and opens ``name``;
    ``begin(None)`` closes the last one.

    As a tracker of the cell (``harness.cell.trackers.Trackers``) it runs from its
    creation to the end of the ``with`` block, however the block ends, and ``finish``
    writes the phases and the ``TIMELINE`` readings into the result."""

    def __init__(self, first: str | None = None, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.last = self.start
        self.current = first
        self.durations: dict[str, float] = {}
        self.end: float | None = None

    def __enter__(self) -> "PhaseClock":
        return self

    def __exit__(self, *exc) -> None:
        self.end = self.begin(None)

    def finish(self, out: dict[str, Any]) -> None:
        out.setdefault(TIMELINE, {}).update(cell_start=self.start, body_end=self.end)
        out.update(self.fields())

    def begin(self, name: str | None, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self.current is not None:
            self.durations[self.current] = self.durations.get(self.current, 0.0) + max(0.0, now - self.last)
        self.current = name
        self.last = now
        return now

    def move(self, seconds: float, src: str, dst: str) -> None:
        """Charge ``seconds`` of ``src``'s time to ``dst`` (a sub-phase measured inside it)."""
        seconds = max(0.0, min(float(seconds or 0.0), self.durations.get(src, 0.0)))
        if seconds:
            self.durations[src] -= seconds
            self.durations[dst] = self.durations.get(dst, 0.0) + seconds

    def fields(self) -> dict[str, float]:
        return {phase_field(n): self.durations.get(n, 0.0) for n in WORKER_PHASES}


def attach_timers(worker: dict[str, Any], *, t_submit: float | None, t_exit: float | None,
                  wall_s: float | None) -> dict[str, Any]:
    """The parent's half of the timers, added to a cell's worker result (in place).

    Takes the worker's ``TIMELINE`` sub-dict out of ``worker``. The time from the child's
    start to the cell's entry (resolving the job's target, importing it if the server did
    not) is added to ``phase_imports_s``. Without the readings (a crash, a timeout, a job
    that is not a cell) only what the parent knows is kept.
    """
    timeline = worker.pop(TIMELINE, None) or {}
    start = timeline.get("child_start")
    cell_start = timeline.get("cell_start")
    body_end = timeline.get("body_end")
    if t_submit is None or t_exit is None or phase_field("measured") not in worker:
        return worker
    if start is not None:
        worker[phase_field("spawn")] = max(0.0, start - t_submit)
        if cell_start is not None:
            worker[phase_field("imports")] = float(worker.get(phase_field("imports")) or 0.0) + max(0.0, cell_start - start)
    if body_end is not None:
        worker[phase_field("teardown")] = max(0.0, t_exit - body_end)
    wall = wall_s if wall_s is not None else t_exit - t_submit
    parts = sum(float(worker.get(phase_field(n)) or 0.0) for n in PHASES)
    worker["phase_unaccounted_s"] = wall - parts
    worker["fixed_cost_s"] = wall - float(worker.get(phase_field("warmup")) or 0.0) \
        - float(worker.get(phase_field("measured")) or 0.0)
    return worker


def fixed_cost(record: dict[str, Any]) -> tuple[float | None, str]:
    """(fixed cost in seconds, where it came from) for any record, old or new.

    ``timers``: the record's own ``fixed_cost_s``. ``approx``: a record from before the
    phase timers: wall time minus the timed warm-up and measured steps (the steps' own
    bookkeeping outside the step timer then counts as fixed cost, a few ms a step).
    ``none``: the cell did not run (no wall time), or it is a timeout / crash.
    """
    if record.get("fixed_cost_s") is not None:
        return float(record["fixed_cost_s"]), "timers"
    wall = record.get("wall_time_s")
    if not wall:
        return None, "none"
    steps = [float(x) for x in (record.get("warmup_step_times_s") or []) + (record.get("step_times_s") or [])]
    return float(wall) - sum(steps), "approx"


def warmup_and_measured(record: dict[str, Any]) -> tuple[float, float]:
    """Seconds spent in warm-up and in the measured window: the phases when recorded, else
    the sums of the timed steps (old records)."""
    if record.get(phase_field("measured")) is not None:
        return float(record.get(phase_field("warmup")) or 0.0), float(record[phase_field("measured")])
    return (float(sum(record.get("warmup_step_times_s") or [])), float(sum(record.get("step_times_s") or [])))


# -- spreads ---------------------------------------------------------------------------

def spread(values: Iterable[float | None]) -> float | None:
    """(max - min) / median of the values that are known; None with fewer than two."""
    vals = [float(v) for v in values if v is not None]
    if len(vals) < 2:
        return None
    med = statistics.median(vals)
    return (max(vals) - min(vals)) / med if med else None
