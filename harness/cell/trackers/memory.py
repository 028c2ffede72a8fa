"""Memory trackers: an NVML sampler for device memory and energy, the process's RSS, and
the torch allocator's peaks.

What each figure counts:
- NVML ``used`` memory is the whole device as the driver sees it: every process, the CUDA
  context (~0.5-1.3 GB), cuBLAS workspaces and bitsandbytes buffers included. The
  sampler records the baseline before the worker touched CUDA, so
  ``peak - baseline`` is what this cell added to the device.
- The torch allocator's ``max_memory_allocated`` counts live tensors only;
  ``max_memory_reserved`` adds the allocator's cached, unused blocks. Neither sees memory
  allocated outside PyTorch.
- RSS is the process's resident host memory: on CPU hosts it is where the model and the
  activations live, so it stands in for VRAM (and the result says so).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Any


def nvml_index_for_visible_device(ordinal: int = 0) -> int:
    """NVML index of CUDA device ``ordinal`` as this process sees it.

    NVML numbers every GPU of the host and ignores CUDA_VISIBLE_DEVICES, so a process
    pinned to one GPU must translate: without CUDA_VISIBLE_DEVICES the ordinal is the
    index (the worker runs with CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML's order); an integer
    entry is an NVML index; a UUID entry (``GPU-...``, what ``--gpus`` pins workers with,
    a prefix is enough as for CUDA) is looked up in NVML. An entry that matches no device
    (a MIG instance, a typo) raises ``LookupError``: reading another GPU's memory instead
    would be a wrong measurement, not a missing one.
    """
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is None or not vis.strip():
        return ordinal
    entries = [e.strip() for e in vis.split(",") if e.strip()]
    if ordinal >= len(entries):
        raise LookupError(f"CUDA_VISIBLE_DEVICES={vis!r} has no device {ordinal}")
    entry = entries[ordinal]
    if entry.isdigit():
        return int(entry)
    import pynvml

    pynvml.nvmlInit()  # reference-counted: safe while a sampler holds NVML open
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            if uuid == entry or uuid.startswith(entry):
                return i
    finally:
        pynvml.nvmlShutdown()
    raise LookupError(f"CUDA_VISIBLE_DEVICES entry {entry!r} matches no NVML device (MIG instances are not supported)")


class MemorySampler:
    """Background thread sampling NVML used memory (if a GPU is present) and RSS.

    ``period_s`` defaults to 5 ms. Peaks shorter than the period can be missed by NVML;
    the torch allocator's peak (exact) is recorded beside it for that reason.

    ``mode``: ``"thread"`` polls from a thread of this process; ``"process"``
    from a small process of its own (``harness.cell.trackers.sampler_proc``), so the training
    loop never waits for Python's lock while the sampler holds it. Both poll the same
    figures; if the process cannot start, the thread takes over (``sampler_mode`` in the
    results says which ran).

    ``period_s=0`` turns sampling off (the sampler's own cost is measured as sampler on
    vs off): no thread runs, NVML is read once for the baseline (and for the
    energy counter), and the results carry no NVML peak (``peak_vram_bytes`` null,
    ``memory_sampler: "off"``) so nothing claims a peak that was not sampled.
    """

    def __init__(self, *, use_nvml: bool, period_s: float = 0.005, nvml_index: int = 0,
                 mode: str = "thread") -> None:
        self.period_s = period_s
        self.sampling = period_s > 0
        self._mode_asked = mode
        self._nvml_index = nvml_index
        self._reset(use_nvml)

    def _reset(self, use_nvml: bool) -> None:
        """Every reading back to nothing; with ``use_nvml``, NVML opened and the baseline read."""
        self.mode = self._mode_asked
        self._proc_handle = None
        self.samples = 0
        self.nvml_error: str | None = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline_vram_bytes: int | None = None
        self.peak_vram_bytes: int | None = None
        self.total_vram_bytes: int | None = None
        self.peak_rss_sampled_bytes = 0
        self._energy_start_mj: int | None = None
        self.energy_j: float | None = None
        self.energy_error: str | None = None
        self._proc = None
        self.nvml_index: int | None = None  # which physical GPU was read (under --gpus, the pinned one)
        self.gpu_uuid: str | None = None
        try:
            import psutil

            self._proc = psutil.Process()
        except Exception:  # pragma: no cover - psutil is a dependency
            pass
        if use_nvml:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(self._nvml_index)
                info = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
                self.baseline_vram_bytes = int(info.used)
                self.peak_vram_bytes = int(info.used)
                self.total_vram_bytes = int(info.total)
                self.nvml_index = int(self._nvml_index)
                try:
                    uuid = pynvml.nvmlDeviceGetUUID(self._handle)
                    self.gpu_uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                except Exception:
                    self.gpu_uuid = None
            except Exception as exc:  # NVML missing (no driver) or refused
                self.nvml_error = f"{type(exc).__name__}: {exc}"
                self._handle = None

    # A tracker (harness.cell.trackers.Trackers): samples while the block runs.
    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def finish(self, out: dict[str, Any]) -> None:
        out.update(self.results())

    def drop_nvml(self) -> None:
        """Start again without NVML (the cell runs on the CPU after all: the device's
        memory is not this cell's)."""
        self.stop()
        self._reset(use_nvml=False)
        self.start()

    @property
    def nvml_ok(self) -> bool:
        return self._handle is not None

    def _sample(self) -> None:
        if self._handle is not None:
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            if used > (self.peak_vram_bytes or 0):
                self.peak_vram_bytes = used
        if self._proc is not None:
            rss = self._proc.memory_info().rss
            if rss > self.peak_rss_sampled_bytes:
                self.peak_rss_sampled_bytes = rss
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as exc:  # keep measuring the rest; say what broke
                self.nvml_error = f"sampling: {exc}"
                return
            self._stop.wait(self.period_s)

    def start(self) -> "MemorySampler":
        if not self.sampling:
            return self
        if self.mode == "process":
            if self._start_process():
                return self
            self.mode = "thread"  # the reason is in nvml_error
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def _start_process(self) -> bool:
        import subprocess
        import sys

        index = self._nvml_index if self._handle is not None else -1
        try:
            self._proc_handle = subprocess.Popen(
                [sys.executable, "-m", "harness.cell.trackers.sampler_proc", str(os.getpid()), repr(self.period_s),
                 str(index)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = self._proc_handle.stdout.readline()  # "ready": it has started sampling
            if line.strip() != "ready":
                raise RuntimeError(f"sampler process said {line.strip()!r}")
            return True
        except Exception as exc:  # noqa: BLE001 - measure with the thread instead
            self.nvml_error = f"sampler process: {type(exc).__name__}: {exc}; sampled from a thread instead"
            if self._proc_handle is not None:
                self._proc_handle.kill()
                self._proc_handle.wait()
            self._proc_handle = None
            return False

    def _stop_process(self) -> None:
        import json

        p, self._proc_handle = self._proc_handle, None
        try:
            out, _ = p.communicate("stop\n", timeout=10)
            data = json.loads(out.strip().splitlines()[-1])
        except Exception as exc:  # noqa: BLE001
            p.kill()
            p.wait()
            self.nvml_error = f"sampler process: no report ({type(exc).__name__}: {exc})"
            return
        self.samples += int(data.get("samples") or 0)
        if data.get("peak_vram_bytes") is not None and self._handle is not None:
            self.peak_vram_bytes = max(self.peak_vram_bytes or 0, int(data["peak_vram_bytes"]))
        if data.get("peak_rss_bytes"):
            self.peak_rss_sampled_bytes = max(self.peak_rss_sampled_bytes, int(data["peak_rss_bytes"]))
        if data.get("error"):
            self.nvml_error = f"sampler process: {data['error']}"

    def stop(self) -> None:
        self._stop.set()
        if self._proc_handle is not None:
            self._stop_process()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if not self.sampling:
            return
        try:
            self._sample()
        except Exception:
            pass

    # Energy: NVML's total energy counter (mJ since driver load; Volta and newer). It
    # covers the whole device, so other work on the same GPU would be counted too.
    def energy_start(self) -> None:
        if self._handle is None:
            return
        try:
            self._energy_start_mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception as exc:
            self.energy_error = f"{type(exc).__name__}: {exc}"

    def energy_stop(self) -> None:
        if self._handle is None or self._energy_start_mj is None:
            return
        try:
            end = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            self.energy_j = (end - self._energy_start_mj) / 1000.0
        except Exception as exc:
            self.energy_error = f"{type(exc).__name__}: {exc}"

    def results(self) -> dict[str, Any]:
        if not self.sampling:
            return {
                "peak_vram_bytes": None,
                "baseline_vram_bytes": self.baseline_vram_bytes,
                "peak_vram_over_baseline_bytes": None,
                "device_total_bytes": self.total_vram_bytes,
                "nvml_samples": 0,
                "nvml_period_s": None,
                "nvml_error": self.nvml_error,
                "memory_sampler": "off",
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_rss_sampled_bytes": None,
            }
        over = None
        if self.peak_vram_bytes is not None and self.baseline_vram_bytes is not None:
            over = self.peak_vram_bytes - self.baseline_vram_bytes
        return {
            "peak_vram_bytes": self.peak_vram_bytes,
            "baseline_vram_bytes": self.baseline_vram_bytes,
            "peak_vram_over_baseline_bytes": over,
            "device_total_bytes": self.total_vram_bytes,
            "nvml_samples": self.samples,
            "nvml_period_s": self.period_s if self.nvml_ok else None,
            "nvml_error": self.nvml_error,
            "memory_sampler": "on",
            "sampler_mode": self.mode,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_sampled_bytes": self.peak_rss_sampled_bytes or None,
        }


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's resident memory (no sampling gaps)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class AllocatorPeaks:
    """The torch allocator's peaks of a CUDA cell, read when the cell ends (a tracker:
    ``harness.cell.trackers.Trackers``; a failed reading leaves the fields out)."""

    def __init__(self, device) -> None:
        self.device = device

    def __enter__(self) -> "AllocatorPeaks":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def finish(self, out: dict[str, Any]) -> None:
        try:
            out.update(torch_memory_stats(self.device))
        except Exception:  # noqa: BLE001 - a broken CUDA context after a failure
            pass


def torch_memory_stats(device) -> dict[str, Any]:
    """The torch allocator's peaks since the last reset (None on CPU: no allocator stats)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return {"torch_peak_allocated_bytes": None, "torch_peak_reserved_bytes": None}
    return {
        "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "torch_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


def wait(seconds: float) -> None:  # small helper for tests of the sampler
    time.sleep(seconds)
