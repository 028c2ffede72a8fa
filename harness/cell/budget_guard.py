"""VRAM budget emulation inside a cell's worker process (worker side: imports torch).

A cell with ``vram_budget_bytes`` behaves as on a card of that size:

1. ``start`` (before the model is built): CUDA creates its context lazily, so the guard
   allocates a tensor and runs one cuBLAS matmul, then reads NVML. The device memory
   this process holds outside PyTorch's allocator, ``NVML used - baseline - torch
   reserved``, is the CUDA context (``cuda_context_bytes``; recorded for every CUDA
   cell, budget or not). The allocator is then capped with
   ``torch.cuda.set_per_process_memory_fraction`` at
   ``budget - baseline - context - INITIAL_RESERVE_BYTES`` (``harness.core.budget``).
2. ``after_step``: libraries load more device code lazily during the first step (torch
   and bitsandbytes kernels, attention kernels), outside the allocator. After each step
   the guard measures that figure again (``non_allocator_peak_bytes``) and re-sets the
   cap to ``budget - baseline - measured - REMEASURED_SLACK_BYTES``.
3. ``finish``: NVML's sampled peak for the cell (``peak_vram_bytes``, the whole device)
   must not exceed the budget. A cell that torch let run but whose device usage went
   over the budget did not fit: its status becomes ``oom`` with the reason, and
   ``budget_exceeded_outside_allocator`` is set.

The fraction's denominator is the device's total memory as torch sees it
(``get_device_properties().total_memory``, the figure the allocator multiplies).
"""

from __future__ import annotations

from typing import Any

from harness.core.budget import GIB, REMEASURED_SLACK_BYTES, allocator_limit_bytes, budget_label
from harness.core.record import Status


class BudgetUnusable(RuntimeError):
    """The budget cannot be emulated here (larger than the device, no NVML)."""


class BudgetTooSmall(RuntimeError):
    """The budget does not even hold the CUDA context: every cell is out of memory."""


class BudgetGuard:
    def __init__(self, budget_bytes: int | None, device, baseline_bytes: int | None, nvml_index: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self.device = device
        self.baseline_bytes = baseline_bytes
        self.context_bytes: int | None = None
        self.non_allocator_peak_bytes: int | None = None
        self.limit_initial_bytes: int | None = None
        self.limit_bytes: int | None = None
        self.total_bytes: int | None = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        except Exception as exc:  # no NVML: nothing to measure against
            self._nvml_error = f"{type(exc).__name__}: {exc}"

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _outside_allocator(self) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        # never negative: NVML and the allocator round differently, and a negative figure
        # would raise the cap above what the budget leaves
        return max(0, self._used() - int(self.baseline_bytes or 0) - int(torch.cuda.memory_reserved(self.device)))

    def _set_limit(self, limit: int) -> None:
        import torch

        assert self.total_bytes
        self.limit_bytes = limit
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, limit / self.total_bytes)), self.device)

    def start(self) -> None:
        import torch

        if self._handle is None or self.baseline_bytes is None:
            if self.budget_bytes is not None:
                raise BudgetUnusable("VRAM budget emulation needs NVML to read the device's real usage: "
                                     f"{getattr(self, '_nvml_error', 'no baseline reading')}")
            return
        x = torch.ones(64, 64, device=self.device)
        (x @ x).sum().item()  # creates the context and the cuBLAS handle
        del x
        self.context_bytes = self._outside_allocator()
        self.total_bytes = int(torch.cuda.get_device_properties(self.device).total_memory)
        if self.budget_bytes is None:
            return
        if self.budget_bytes > self.total_bytes:
            raise BudgetUnusable(f"the {budget_label(self.budget_bytes)} budget is larger than this device "
                                 f"({self.total_bytes / GIB:.1f} GiB)")
        limit = allocator_limit_bytes(self.budget_bytes, baseline_bytes=self.baseline_bytes,
                                      non_allocator_bytes=self.context_bytes)
        self.limit_initial_bytes = limit
        if limit <= int(torch.cuda.memory_reserved(self.device)):
            raise BudgetTooSmall(
                f"out of memory: the {budget_label(self.budget_bytes)} budget does not hold the device's idle usage "
                f"({self.baseline_bytes / GIB:.2f} GiB) and the CUDA context ({self.context_bytes / GIB:.2f} GiB)")
        self._set_limit(limit)

    # A tracker (harness.cell.trackers.Trackers): entering caps the allocator, ``finish``
    # gives the verdict; the cap itself ends with the cell's process.
    def __enter__(self) -> "BudgetGuard":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def after_step(self) -> None:
        """Measure memory held outside the allocator now; re-set the cap from it."""
        if self.context_bytes is None:
            return
        outside = self._outside_allocator()
        self.non_allocator_peak_bytes = max(outside, self.non_allocator_peak_bytes or 0)
        if self.budget_bytes is not None:
            self._set_limit(allocator_limit_bytes(self.budget_bytes, baseline_bytes=int(self.baseline_bytes or 0),
                                                  non_allocator_bytes=self.non_allocator_peak_bytes,
                                                  reserve_bytes=REMEASURED_SLACK_BYTES))

    def finish(self, out: dict[str, Any]) -> None:
        """Record what the guard measured; a budget cell over its budget in NVML is an OOM."""
        out["cuda_context_bytes"] = self.context_bytes
        out["non_allocator_peak_bytes"] = self.non_allocator_peak_bytes
        if self.budget_bytes is None:
            return
        out["vram_budget_bytes"] = self.budget_bytes
        out["allocator_limit_initial_bytes"] = self.limit_initial_bytes
        out["allocator_limit_bytes"] = self.limit_bytes
        out["budget_fraction"] = (self.limit_bytes / self.total_bytes) if (self.limit_bytes and self.total_bytes) else None
        peak = out.get("peak_vram_bytes")
        within = None if peak is None else bool(peak <= self.budget_bytes)
        out["nvml_peak_within_budget"] = within
        out["budget_exceeded_outside_allocator"] = False
        if within is False and out.get("status") == Status.OK.value:
            # torch stayed under its cap, but the device as a whole went over the budget
            # (memory outside the allocator grew): on a card of this size it would not fit.
            out["status"] = Status.OOM.value
            out["budget_exceeded_outside_allocator"] = True
            out["error"] = (f"out of memory at the {budget_label(self.budget_bytes)} budget: NVML peak "
                            f"{peak / GIB:.2f} GiB exceeded it outside PyTorch's allocator (torch reserved peak "
                            f"{(out.get('torch_peak_reserved_bytes') or 0) / GIB:.2f} GiB)")
            out["oom_phase"] = "verify"


def prepare_checkpoint(spec, opts: dict[str, Any]) -> bool:
    """Write the synthetic checkpoint a CUDA cell will load, before the cell measures.

    Writing it builds the full model in bf16 on the device (``harness.cell.build``),
    which is not part of training: no small budget holds it, and without a budget the
    freed blocks stay in the allocator's cache and inflate the first pretrained cell's
    peaks (on the H200 reference run, int8/s512/gc-off: torch reserved 20.2 GiB against
    13.9 GiB for the same cell with checkpointing). Called before the NVML baseline is
    read, and the memory is freed again; the CUDA context this creates then counts in
    that one cell's baseline (its ``cuda_context_bytes`` is near zero; a budget subtracts
    the baseline, so the accounting holds). Returns whether it wrote the checkpoint
    (once per cache folder).
    """
    if spec.resolved_load() != "pretrained" or spec.model_path:
        return False
    from harness.core.models import get_preset
    from harness.cell.build import checkpoint_dir, ensure_checkpoint

    preset = get_preset(spec.model)
    if (checkpoint_dir(preset, opts.get("cache_dir")) / ".complete").is_file():
        return False
    import gc

    import torch

    if not torch.cuda.is_available():
        return False
    ensure_checkpoint(preset, device="cuda:0", cache_dir=opts.get("cache_dir"),
                      log=lambda m: print(m, flush=True))
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return True
