"""Fake cells for the harness's own tests: an oracle with known memory needs, a fake GPU
host for the claims, and nothing that touches a device."""

from harness.fit import rules as F
from harness.core.budget import GIB, MIB, REMEASURED_SLACK_BYTES, allocator_limit_bytes

BASE, CTX, OUTSIDE = int(0.6 * GIB), int(0.5 * GIB), int(0.8 * GIB)


class Oracle:
    """A cell needs fixed + per_token * L live bytes plus ``frag`` at the cap; it fits when
    that is within the allocator limit its budget gives (the worker's formula)."""

    def __init__(self, fixed=6 * GIB, per_token=2 * MIB, frag=F.DEFAULT_FRAGMENTATION_BYTES):
        self.fixed, self.per_token, self.frag = fixed, per_token, frag
        self.calls = []

    def limit(self, budget):
        return allocator_limit_bytes(budget, baseline_bytes=BASE, non_allocator_bytes=OUTSIDE,
                                     reserve_bytes=REMEASURED_SLACK_BYTES)

    def need(self, L):
        return self.fixed + self.per_token * L + self.frag

    def threshold(self, budget, grid):
        ok = [L for L in range(grid.lo, grid.hi + 1, grid.granularity) if self.need(L) <= self.limit(budget)]
        return max(ok) if ok else None

    def record(self, cell, budget=None):
        budget = cell.vram_budget_bytes if budget is None else budget
        alloc = self.fixed + self.per_token * cell.seq_len
        fits = budget is None or self.need(cell.seq_len) <= self.limit(budget)
        return {"cell_id": cell.cell_id, "spec": cell.to_dict(), "seq_len": cell.seq_len, "batch_size": 1,
                "status": "ok" if fits else "oom", "error": None if fits else "CUDA out of memory",
                "torch_peak_allocated_bytes": alloc if fits else None,
                "torch_peak_reserved_bytes": alloc + self.frag if fits else None,
                "peak_vram_bytes": BASE + OUTSIDE + alloc + self.frag if fits else None,
                "baseline_vram_bytes": BASE, "cuda_context_bytes": CTX, "non_allocator_peak_bytes": OUTSIDE,
                "allocator_limit_bytes": None if budget is None else self.limit(budget), "wall_time_s": 2.0,
                "nvml_peak_within_budget": None if (budget is None or not fits)
                else BASE + OUTSIDE + alloc + self.frag <= budget,
                "timestamp": str(len(self.calls))}

    def __call__(self, cell):
        self.calls.append(cell)
        return self.record(cell)



class FakeHost(Oracle):
    """A GPU host by numbers: per (precision, checkpointing) live bytes = fixed + per_token * L.
    As on the H200, int8 with gc-on keeps activations checkpointing cannot free (LLM.int8's
    autograd function holds them): more memory per token than bf16, a higher peak."""

    SHAPES = {("bf16", "off"): (15.5 * GIB, 8 * MIB), ("bf16", "on"): (15.5 * GIB, 1.75 * MIB),
              ("bf16", "offload"): (15.5 * GIB, 1.5 * MIB), ("int8", "offload"): (9 * GIB, 1.5 * MIB),
              ("int8", "off"): (9 * GIB, 8 * MIB), ("int8", "on"): (9 * GIB, 6 * MIB),
              ("nf4", "on"): (6.2 * GIB, 1.75 * MIB), ("nf4", "offload"): (6.2 * GIB, 1.5 * MIB)}
    CMP = {"fp32": (40 * GIB, 900.0), "bf16": (21 * GIB, 5800.0), "int8": (19 * GIB, 2500.0), "nf4": (12 * GIB, 4500.0)}
    CMP_BY_MODE = {("int8", "on"): (27 * GIB, 2500.0)}

    def record(self, cell, budget=None):
        if cell.vram_budget_bytes is None:  # a comparison cell
            peak, tps = self.CMP_BY_MODE.get((cell.precision, cell.grad_ckpt), self.CMP[cell.precision])
            return {"cell_id": cell.cell_id, "spec": cell.to_dict(), "seq_len": cell.seq_len, "status": "ok",
                    "peak_vram_bytes": peak, "torch_peak_allocated_bytes": peak - GIB, "tokens_per_s": tps,
                    "losses": [11.8, 11.6 + (0.0 if cell.precision in ("fp32", "bf16") else 0.1)], "wall_time_s": 1.0}
        self.fixed, self.per_token = self.SHAPES[(cell.precision, cell.grad_ckpt)]
        return super().record(cell, budget)
