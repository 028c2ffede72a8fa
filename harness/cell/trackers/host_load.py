"""How busy the host and the GPU were around a cell, for the record's quality fields
(worker side; NVML through pynvml when it is there, nothing that needs torch).

- the host's 1-minute load average when the cell starts and when its measured steps end,
  against the CPUs this process may use: a load above them means other work competed
  for the CPUs that launch the cell's kernels;
- the other compute processes on the cell's GPU (NVML's list; many containers show none,
  then the figure is unknown rather than zero);
- how busy the GPU was during one extra, profiled training step (``profile_step``).
"""

from __future__ import annotations

import os
from typing import Any, Callable


def load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def gpu_processes(nvml_index: int | None) -> int | None:
    """Compute processes on the GPU other than this one; None where NVML lists none (a
    container hiding them, or no NVML)."""
    if nvml_index is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(int(nvml_index))
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or refusing: unknown
        return None
    if not procs:
        return None
    ours = os.getpid()
    return sum(1 for p in procs if getattr(p, "pid", None) != ours) if any(
        getattr(p, "pid", None) == ours for p in procs) else max(0, len(procs) - 1)


def at_start(out: dict[str, Any]) -> None:
    out["load_avg_before"] = load_avg()
    out["cpu_count"] = cpu_count()


def after_window(out: dict[str, Any], nvml_index: int | None) -> None:
    out["load_avg_after"] = load_avg()
    out["gpu_other_processes"] = gpu_processes(nvml_index)


def profile_step(step_fn: Callable[[], Any], device, median_step_s: float | None) -> dict[str, Any]:
    """One extra training step under the profiler, after the measured window: the share
    of a step the GPU spends running kernels or copies. The union of device activity
    over the median unprofiled step time (the profiler slows the host side of its own
    step, so its own wall time would understate how busy a plain step keeps the GPU)."""
    from harness.cell.trackers.gpu_busy import BusyProfile

    if getattr(device, "type", None) != "cuda":
        return {}
    try:
        with BusyProfile(device) as prof:
            step_fn()
        res = prof.result()
    except Exception as exc:  # noqa: BLE001 - a diagnosis, never the cell's failure
        return {"gpu_busy_error": f"{type(exc).__name__}: {exc}"[:300]}
    busy_s = res.get("busy_s")
    if busy_s is None:
        return {"gpu_busy_error": res.get("reason")}
    base = median_step_s or res.get("wall_s")
    return {"gpu_busy_fraction": round(min(1.0, busy_s / base), 4) if base else None,
            "gpu_kernels_per_step": res.get("kernels"), "gpu_kernel_median_us": res.get("median_kernel_us")}
