"""The harness's own performance (issue 7): the adaptive measured window, the phase timers
of a cell, and the figures derived from them. Pure module (no torch, no I/O).

**Adaptive window** (``window_decision``). With ``M(i)`` the median of the first ``i``
measured step times (the figure a record reports as ``step_time_s`` once ``i`` steps ran),
after measured step ``n`` the window stops with the first rule that holds:

1. ``stable``: ``n >= min_steps``, ``n > stable_steps`` and the medians
   ``M(n - stable_steps), ..., M(n)`` all lie within ``stable_rel * M(n)`` of each other
   (max minus min): the reported median has stopped moving;
2. ``time_cap``: ``n >= min_steps`` and the measured steps took ``time_cap_s`` seconds
   or more in all (warm-up excluded);
3. ``max_steps``: ``n >= max_steps``.

A window never stops before ``min_steps`` (the cell's ``steps``), whatever the cap says.

**Phase timers** (``PhaseClock`` in the worker, ``attach_timers`` in the parent). A cell's
wall time is cut into consecutive phases on one clock (``time.monotonic``, which on Linux
is the same system-wide clock in the parent and in the worker):

    submitted -> spawn -> imports -> checkpoint_write -> device_init -> model_load
    -> lora_wrap -> data_prep -> warmup -> measured -> verify -> teardown -> exit seen

so the parts add up to ``wall_time_s`` (``phase_unaccounted_s`` is what is left, ~0).
``fixed_cost_s = wall_time_s - phase_warmup_s - phase_measured_s``. docs/results-schema.md
says what each phase covers.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable


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


# -- the adaptive window ---------------------------------------------------------------


# -- phase timers ----------------------------------------------------------------------

class PhaseClock:
    """Consecutive phases of the worker's timeline: ``begin(name)`` closes the phase in
    progress (its time is added to its name; a name may recur) and opens ``name``;
    ``begin(None)`` closes the last one."""

    def __init__(self, first: str | None = None, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.last = self.start
        self.current = first
        self.durations: dict[str, float] = {}

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

    The worker leaves its absolute clock readings in ``_t_child_start`` (first line of the
    job in the new process), ``_t_cell_start`` (entry of ``run_cell``) and ``_t_body_end``
    (the cell's work done, before its own clean-up); they are removed here. The time from
    the child's start to the cell's entry (resolving the job's target, importing it if the
    server did not) is added to ``phase_imports_s``. Without them (a crash, a timeout, a
    job that is not a cell) only what the parent knows is kept.
    """
    start = worker.pop("_t_child_start", None)
    cell_start = worker.pop("_t_cell_start", None)
    body_end = worker.pop("_t_body_end", None)
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
