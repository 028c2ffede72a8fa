"""How busy the GPU is during a training step: the fraction of the step's wall time in
which at least one kernel (or memory copy / set) was running on the device.

Why: a LoRA step of an 8B model at 2048 tokens launches thousands of small kernels, and
on the H200 host launching one costs 5.9-12.3 us of host CPU; a step whose GPU idles
between launches is timed by the host, not the GPU, and its tokens/s wander with the
host. The busy fraction says which kind of step a cell is.

Two ways, both ``None`` with a reason where they cannot measure (no CUDA device, no
NVML, no profiler):

- :class:`BusyProfile` / :func:`profiled_busy_fraction`: one extra step under
  ``torch.profiler`` with CUDA activity only, outside the measured window. From its
  Chrome trace, the device events (``cat`` ``kernel``, ``gpu_memcpy``, ``gpu_memset``;
  ``ts`` / ``dur`` in microseconds) are merged into a union of intervals;
  ``busy_fraction`` = union / the step's wall time between two device
  synchronisations, plus the kernel count and the median kernel duration. The profiler
  adds host work to every launch, so the profiled step is slower than a plain one and
  ``busy_fraction`` is a lower bound; ``busy_s`` (the union itself) divided by an
  unprofiled step time is the better estimate when one is at hand.
- :func:`nvml_busy_fraction`: NVML's GPU utilisation samples
  (``nvmlDeviceGetSamples(handle, NVML_GPU_UTILIZATION_SAMPLES, lastSeenTimeStamp)``:
  per sample the percent of the preceding sample period in which a kernel ran; CPU
  timestamps in microseconds) that fall wholly inside given wall-clock windows, and
  ``nvmlDeviceGetUtilizationRates(handle).gpu`` at the end. Device-wide and coarse (a
  sample period is 1/6 s to 1 s depending on the GPU), but free of profiler overhead.

Imports torch and pynvml inside functions only.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


# -- interval arithmetic (pure) -----------------------------------------------------------

def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping or touching intervals merged; sorted; empty ones dropped."""
    merged: list[list[float]] = []
    for start, end in sorted((float(s), float(e)) for s, e in intervals if e > s):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by at least one interval."""
    return sum(e - s for s, e in merge_intervals(intervals))


def busy_from_trace(events: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Busy figures from Chrome-trace events (``ts`` / ``dur`` in microseconds) of a step
    that took ``wall_s`` seconds on the host clock."""
    dev = [e for e in events if e.get("ph", "X") == "X" and e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in dev]
    kernels = [float(e["dur"]) for e in dev if e.get("cat") == "kernel"]
    busy_us = union_length(spans)
    span_us = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
    return {
        "busy_fraction": busy_us / 1e6 / wall_s if wall_s > 0 else None,
        "busy_s": busy_us / 1e6,
        "wall_s": wall_s,
        "kernels": len(kernels),
        "copies": len(dev) - len(kernels),
        "median_kernel_us": statistics.median(kernels) if kernels else None,
        "kernel_sum_s": sum(kernels) / 1e6,
        "device_span_s": span_us / 1e6,
        "busy_of_device_span": busy_us / span_us if span_us > 0 else None,
        "reason": None,
    }


def samples_in_windows(samples: Sequence[tuple[int, float]], windows_us: Sequence[tuple[float, float]],
                       period_us: float | None = None) -> list[float]:
    """Values of the samples ``(timestamp_us, value)`` whose period ``(ts - period, ts]``
    lies wholly inside one of the windows (the period estimated from the samples' spacing
    when not given)."""
    if period_us is None:
        ts = sorted(t for t, _ in samples)
        gaps = [b - a for a, b in zip(ts, ts[1:]) if b > a]
        period_us = statistics.median(gaps) if gaps else 0.0
    return [v for t, v in samples if any(lo <= t - period_us and t <= hi for lo, hi in windows_us)]


# -- the profiled step (torch) -------------------------------------------------------------

def _cuda_reason(device) -> str | None:
    """Why no device figures can be had for ``device`` (None: they can)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return f"torch cannot be imported: {exc}"
    kind = getattr(device, "type", str(device) if device is not None else "cuda")
    if not str(kind).startswith("cuda"):
        return f"the step runs on {kind}, not on a CUDA device"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _trace_events(prof) -> list[dict[str, Any]]:
    fd, path = tempfile.mkstemp(suffix=".json", prefix="lh-busy-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            data = json.load(f)
    finally:
        os.remove(path)
    return data.get("traceEvents", []) if isinstance(data, dict) else list(data)


class BusyProfile:
    """``with BusyProfile(device) as p: <one step>``; then ``p.result()``.

    The step runs either way; where no CUDA profile can be taken the result says why."""

    def __init__(self, device=None) -> None:
        self.device = device
        self.reason: str | None = None
        self.info: dict[str, Any] | None = None
        self._prof = None
        self._t0 = 0.0

    def __enter__(self) -> "BusyProfile":
        self.reason = _cuda_reason(self.device)
        if self.reason:
            return self
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(self.device)
        try:
            self._prof = profile(activities=[ProfilerActivity.CUDA])
            self._prof.__enter__()
        except Exception as exc:  # noqa: BLE001 - a missing CUPTI must not end the step
            self._prof, self.reason = None, f"torch.profiler could not start: {type(exc).__name__}: {exc}"
            return self
        torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if self._prof is None:
            return False
        import torch

        torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        try:
            self._prof.__exit__(None, None, None)
            self.info = busy_from_trace(_trace_events(self._prof), wall)
        except Exception as e:  # noqa: BLE001
            self.reason = f"could not read the profile: {type(e).__name__}: {e}"
        self._prof = None
        return False

    def result(self) -> dict[str, Any]:
        if self.info is not None:
            return dict(self.info, method="torch.profiler (CUDA activity), one extra step")
        return {"busy_fraction": None, "reason": self.reason or "not measured",
                "method": "torch.profiler (CUDA activity), one extra step"}


def profiled_busy_fraction(step_fn: Callable[[], Any], device) -> dict[str, Any]:
    """Run ``step_fn()`` once under the profiler; its busy figures (``busy_fraction``
    None with a ``reason`` where it cannot be measured; the step runs anyway)."""
    with BusyProfile(device) as p:
        step_fn()
    return p.result()


# -- NVML ----------------------------------------------------------------------------------

_VALUE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class NvmlUtilLog:
    """NVML's GPU utilisation samples of one device, gathered by :meth:`poll` (call it
    between steps: NVML keeps a short buffer), attributed to windows by :meth:`busy`."""

    def __init__(self, nvml_index: int | None) -> None:
        self.samples: dict[int, float] = {}
        self.reason: str | None = None
        self.rate_at_end: float | None = None
        self._nvml = self._handle = None
        if nvml_index is None:
            self.reason = "no NVML device (not a CUDA run)"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        except Exception as exc:  # noqa: BLE001 - NVML missing or refusing
            self.reason = f"NVML: {type(exc).__name__}: {exc}"
        self._last = int(time.time() * 1e6)

    def poll(self) -> None:
        if self._handle is None:
            return
        nv = self._nvml
        try:
            vtype, got = nv.nvmlDeviceGetSamples(self._handle, nv.NVML_GPU_UTILIZATION_SAMPLES, self._last)
        except nv.NVMLError as exc:
            if getattr(exc, "value", None) != getattr(nv, "NVML_ERROR_NOT_FOUND", -1):  # NOT_FOUND: none newer
                self.reason = f"nvmlDeviceGetSamples: {exc}"
            return
        field = _VALUE_FIELDS.get(int(vtype), "uiVal")
        for s in got:
            self.samples[int(s.timeStamp)] = float(getattr(s.sampleValue, field))
        if self.samples:
            self._last = max(self.samples)

    def busy(self, windows_s: Sequence[tuple[float, float]]) -> dict[str, Any]:
        """Mean utilisation (as a fraction) of the samples wholly inside the wall-clock
        windows (``time.time()`` seconds)."""
        base = {"busy_fraction": None, "samples": 0, "samples_total": len(self.samples),
                "method": "NVML GPU utilisation samples", "reason": self.reason}
        if self._handle is None:
            return base
        try:
            self.rate_at_end = float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except Exception:  # noqa: BLE001
            pass
        pairs = sorted(self.samples.items())
        gaps = [b - a for (a, _), (b, _) in zip(pairs, pairs[1:]) if b > a]
        period = statistics.median(gaps) if gaps else None
        inside = samples_in_windows(pairs, [(a * 1e6, b * 1e6) for a, b in windows_s], period or 0.0)
        out = dict(base, samples=len(inside), sample_period_s=period / 1e6 if period else None,
                   utilization_rate_at_end=self.rate_at_end)
        if not inside:
            return dict(out, reason=self.reason or f"none of NVML's {len(pairs)} samples lies wholly inside a window")
        return dict(out, busy_fraction=statistics.fmean(inside) / 100.0, reason=None)

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            self._nvml.nvmlShutdown()


def nvml_busy_fraction(nvml_index: int | None, windows_s: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """One-shot :class:`NvmlUtilLog`: the samples NVML still holds for the windows
    (``busy_fraction`` None with a reason where NVML cannot answer or none fits)."""
    log = NvmlUtilLog(nvml_index)
    if log._handle is not None:
        log._last = int(min((s for s, _ in windows_s), default=time.time()) * 1e6) - 2_000_000
    log.poll()
    try:
        return log.busy(windows_s)
    finally:
        log.close()
