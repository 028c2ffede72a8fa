"""The memory sampler's polling loop in its own small process.

``MemorySampler(mode="process")`` starts ``python -m harness.cell.trackers.sampler_proc PID
PERIOD_S NVML_INDEX``: it polls NVML's ``used`` memory of the device (device-wide, so any
process sees the same figure) and the resident memory of process PID every PERIOD_S
seconds, until a line arrives on its stdin or stdin closes (the cell's process ended);
then it prints one JSON line: ``{"samples", "peak_vram_bytes", "peak_rss_bytes", "error"}``.

In a thread of the cell's own process the sampler has to take Python's lock every period,
and the training loop waits for it whenever it wants the lock back; in its own process
it never does. Imports: the standard library, pynvml and psutil only (starts in ~50 ms).
"""

from __future__ import annotations

import json
import os
import select
import sys


def main(argv: list[str]) -> int:
    pid, period, index = int(argv[0]), float(argv[1]), int(argv[2])
    out = {"samples": 0, "peak_vram_bytes": None, "peak_rss_bytes": None, "error": None}
    handle = nvml = proc = None
    try:
        import psutil

        proc = psutil.Process(pid)
    except Exception as exc:  # noqa: BLE001 - report, keep sampling what works
        out["error"] = f"psutil: {type(exc).__name__}: {exc}"
    if index >= 0:
        try:
            import pynvml as nvml

            nvml.nvmlInit()
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001
            out["error"] = f"NVML: {type(exc).__name__}: {exc}"
            handle = None
    print("ready", flush=True)  # the parent waits for this: sampling has begun
    stdin = sys.stdin.fileno()
    while True:
        try:
            if handle is not None:
                used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
                if out["peak_vram_bytes"] is None or used > out["peak_vram_bytes"]:
                    out["peak_vram_bytes"] = used
            if proc is not None:
                rss = int(proc.memory_info().rss)
                if out["peak_rss_bytes"] is None or rss > out["peak_rss_bytes"]:
                    out["peak_rss_bytes"] = rss
            out["samples"] += 1
        except Exception as exc:  # noqa: BLE001 - the process went away, or NVML broke
            out["error"] = f"sampling: {type(exc).__name__}: {exc}"
            break
        r, _, _ = select.select([stdin], [], [], period)
        if r:
            os.read(stdin, 4096)  # "stop", or end of file: either way, report and leave
            break
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
