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


# -- how far a record's speed figures can be trusted ----------------------------------------

# A window whose measured steps spread (max - min) / median by more than this is unstable:
# its median moves with which steps happened to be slow. 20%: on a quiet GPU host a
# cell's steps agree within a few percent; the H200 runs of 2026-12-05 on a loaded host
# spread 20-56% and did not repeat.
STABLE_SPREAD = 0.20
MIN_STEPS_TO_JUDGE = 3
# A step whose GPU runs kernels less than this share of the time waits on the host CPU
# (launch-bound): its tokens/s measure the host as much as the GPU.
HOST_BOUND_BELOW = 0.85


def is_stable(record: dict[str, Any]) -> bool | None:
    """The record's own verdict, or one from its measured steps (older records); None
    with too few steps to judge."""
    if isinstance(record.get("stable"), bool):
        return record["stable"]
    steps = [float(x) for x in record.get("step_times_s") or [] if isinstance(x, (int, float)) and x > 0]
    if len(steps) < MIN_STEPS_TO_JUDGE:
        return None
    med = statistics.median(steps)
    return (max(steps) - min(steps)) / med <= STABLE_SPREAD if med > 0 else None


def quality(worker: dict[str, Any]) -> dict[str, Any]:
    """The quality fields of a cell's record from what its worker measured: ``stable``,
    ``host_busy``, ``host_bound`` and the notes that say why its speed figures are not
    to be compared (absent when there is none)."""
    out: dict[str, Any] = {"stable": is_stable(worker)}
    notes = []
    if out["stable"] is False:
        notes.append(f"unstable: measured steps spread {worker.get('step_time_spread', 0):.0%} "
                     f"(> {STABLE_SPREAD:.0%})")
    cpus = worker.get("cpu_count")
    loads = [v for v in (worker.get("load_avg_before"), worker.get("load_avg_after")) if isinstance(v, (int, float))]
    if cpus and loads:
        out["host_busy"] = max(loads) > cpus
        if out["host_busy"]:
            notes.append(f"host busy: load average {max(loads):.1f} on {cpus} CPUs")
    if worker.get("gpu_other_processes"):
        notes.append(f"{worker['gpu_other_processes']} other process(es) on the GPU")
    busy = worker.get("gpu_busy_fraction")
    if isinstance(busy, (int, float)):
        out["host_bound"] = busy < HOST_BOUND_BELOW
        if out["host_bound"]:
            notes.append(f"host-bound: the GPU was busy {busy:.0%} of a step (< {HOST_BOUND_BELOW:.0%}); "
                         "tokens/s follow the host CPU")
    if notes:
        out["quality_notes"] = notes
    return out
