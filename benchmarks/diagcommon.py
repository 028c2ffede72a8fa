"""Shared by the GPU diagnostics ``benchmarks/offload_memory.py`` and
``benchmarks/int8_memory.py``: real harness cells (``harness.cell.train.run_cell``, the
code a sweep's cell runs) with diagnostic hooks, each in a fresh process forked by the
harness's worker server (the libraries imported once), under a ``--time-limit``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perfcommon import ensure_checkpoints, sweep_config  # noqa: E402

from harness.run.forkserver import ForkServerRunner, classify  # noqa: E402

GIB = 2 ** 30
# torch.cuda.memory_stats() figures that say how the caching allocator fared
ALLOCATOR_KEYS = ("allocated_bytes.all.peak", "reserved_bytes.all.peak", "active_bytes.all.peak",
                  "requested_bytes.all.peak", "inactive_split_bytes.all.peak", "inactive_split.all.peak",
                  "num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc", "num_device_free")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    """``--time-limit``: what is left of it, and whether a cell expected to take ``guess``
    seconds still fits (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.t0, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()

    def fits(self, guess: float) -> bool:
        left = self.left()
        return left is None or (left > 0 and guess <= left)


def allocator_stats(device=None) -> dict[str, Any]:
    """The caching allocator's peaks and counters (``None`` values with a reason off CUDA)."""
    import torch

    if not torch.cuda.is_available() or (device is not None and getattr(device, "type", "cuda") != "cuda"):
        return {"reason": "no CUDA device: the caching allocator has no statistics"}
    stats = torch.cuda.memory_stats(device)
    return {k: int(stats[k]) if k in stats else None for k in ALLOCATOR_KEYS}


def cells_for(a, precisions: list[str], modes: list[str]):
    """{(precision, mode): CellSpec}: the cells ``lora-harness run`` would run with these options."""
    wanted = [(p, a.seq_len, m) for p in precisions for m in modes]
    cfg, facts = sweep_config(model=a.model, cells=wanted, run_dir=Path(a.out) / "run", steps=a.steps,
                              warmup_steps=a.warmup_steps, device=a.device, cache_dir=a.cache_dir,
                              cell_timeout=a.cell_timeout)
    return {(c.precision, c.grad_ckpt): c for c in cfg.cells}, cfg, facts


class CellRunner:
    """The harness's worker server, and diagnostic cells run through it one at a time."""

    def __init__(self, out: Path, budget: Budget, cell_timeout: float) -> None:
        self.out, self.budget, self.cell_timeout = out, budget, cell_timeout
        self.runner = ForkServerRunner(out / "logs")
        t = time.monotonic()
        ready = self.runner.start()
        log(f"worker server ready in {time.monotonic() - t:.1f} s (libraries in {ready.get('preload_s', 0):.1f} s)")
        self.longest: dict[str, float] = {}  # precision -> the longest cell so far (what the next may take)

    def checkpoints(self, cfg) -> dict[str, Path]:
        t = time.monotonic()
        out = ensure_checkpoints(self.runner, cfg.cells, cfg.cache_dir, cfg.device, self.out / "logs")
        if out:
            log(f"synthetic checkpoint ready in {time.monotonic() - t:.1f} s")
        return out

    def run(self, target: str, name: str, cell, opts: dict[str, Any], env: dict[str, str] | None = None,
            **args: Any) -> dict[str, Any]:
        """One diagnostic cell in a fresh forked process; its result, or why it did not run."""
        if not self.budget.fits(self.longest.get(cell.precision, 0.0)):
            log(f"{name}: not started (time limit: {self.budget.left() or 0:.0f} s left)")
            return {"status": "not run", "error": "time limit"}
        left = self.budget.left()
        timeout = self.cell_timeout if left is None else max(5.0, min(self.cell_timeout, left))
        log(f"{name}: running")
        path = self.out / "logs" / f"{name.replace('/', '_')}.log"
        outcome = self.runner.run_job(target, {"spec_dict": cell.to_dict(), "opts": opts, **args}, timeout_s=timeout,
                                      log_path=path, env=env)
        res = classify(outcome, timeout)
        res["wall_time_s"] = outcome.wall_s
        res["log"] = os.path.relpath(path, self.out)
        self.longest[cell.precision] = max(self.longest.get(cell.precision, 0.0), outcome.wall_s)
        log(f"{name}: {res.get('status')} in {outcome.wall_s:.1f} s" + (f": {str(res.get('error'))[:200]}"
                                                                        if res.get("status") != "ok" else ""))
        return res

    def close(self) -> None:
        self.runner.close()


def gib(x) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f}"


def size(x) -> str:
    """Bytes in the unit that reads best: GiB from 0.1 GiB, else MiB or KiB."""
    if x is None:
        return "n/a"
    if abs(x) >= 0.1 * GIB:
        return f"{x / GIB:.2f} GiB"
    return f"{x / 2**20:.2f} MiB" if abs(x) >= 2**20 else f"{x / 1024:.1f} KiB"


def write(out: Path, stem: str, data: dict[str, Any], md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(md)
