"""Longest-context search: what a measured cell says about each budget, the bracket it
leaves, and the next length worth measuring. Pure module (no torch, no I/O).

Lengths live on a grid: ``granularity``, ``2 * granularity``, ... up to ``max_seq_len``.
The answer for a row (model x precision x checkpointing x batch) and a budget is the
longest grid length that trains there without running out of memory: ``OOM`` when even
the shortest fails, ``>= max`` when the cap itself fits.

Reuse rule (``verdict``). Memory grows with the length and a larger card only helps, so
a cell that fits at (L, B0) fits at every (L' <= L, B >= B0), and one that ran out of
memory at (L, B0) fails at every (L' >= L, B <= B0). Beyond that, a record's measured
peaks speak for budgets it did not run under:

- fits at B when it ran every step (two or more), its torch peak *reserved* stayed under
  the allocator limit B implies and its NVML peak stayed ``REUSE_MARGIN_BYTES`` under B:
  under B the allocator would never have reached its cap, so the run would have been the
  same one;
- fails at B when its torch peak *allocated* (live tensors, which no allocator policy
  can shrink) exceeds the most generous limit B implies;
- otherwise it says nothing about B, and a real cell under B decides. Boundaries are
  therefore always confirmed by cells that ran under a budget (or a smaller one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from harness.core.axes import is_quantised
from harness.core.spec import LoraSpec
from harness.core.budget import GIB, MIB, REMEASURED_SLACK_BYTES, allocator_limit_bytes, budget_label

# An unconstrained NVML peak must sit this far under a budget to count as a fit there:
# run-to-run variation of memory outside the allocator, and NVML's sampling gaps.
REUSE_MARGIN_BYTES = 512 * MIB
# Guesses before a host has been measured: idle usage and memory outside the allocator
# on the H200 reference run (baseline 0.60 GiB; NVML over baseline minus torch reserved
# 0.75-0.90 GiB), and a first allowance for allocator fragmentation at the cap.
DEFAULT_BASELINE_BYTES = int(0.6 * GIB)
DEFAULT_NON_ALLOCATOR_BYTES = int(0.9 * GIB)
DEFAULT_FRAGMENTATION_BYTES = 512 * MIB
DEFAULT_START = 2048

# Fields that make two cells the same row for the search (everything that changes the
# memory a step needs except the length and the budget).
ROW_FIELDS = ("model", "model_path", "precision", "grad_ckpt", "batch_size", "lora", "optimizer",
              "attn_implementation", "stack", "compile")
ROW_DEFAULTS = {"attn_implementation": "sdpa", "stack": "hf", "compile": False}
_LORA_DEFAULTS = dataclasses.asdict(LoraSpec())


def row_key(spec: dict[str, Any]) -> tuple:
    """Identity of a row from a spec dict (the ``load`` path resolved: auto = what it does;
    settings a spec was written without take their defaults)."""
    spec = {**ROW_DEFAULTS, **{k: v for k, v in spec.items() if v is not None or k not in ROW_DEFAULTS}}
    quant = is_quantised(spec.get("precision"))
    load = spec.get("load") or "auto"
    if load == "auto":
        load = "pretrained" if (quant or spec.get("model_path") or spec.get("stack") == "unsloth") else "config"
    # Records are upgraded on reading (harness.core.schema.upgrade); a spec handed in
    # directly may still predate a LoRA setting: it ran with that setting's default.
    lora = {**_LORA_DEFAULTS, **(spec.get("lora") or {})}
    return tuple(str(spec.get(f)) if f != "lora" else tuple(sorted(lora.items())) for f in ROW_FIELDS) + (load,)


@dataclass(frozen=True)
class Observation:
    """What one record says about one budget: fits or fails at ``seq_len``, and why."""

    seq_len: int
    fits: bool
    cell_id: str
    why: str


def _limits(rec: dict[str, Any], budget_bytes: int) -> tuple[int, int] | None:
    """(strictest, most generous) allocator limit a cell like ``rec`` gets under a budget."""
    base = rec.get("baseline_vram_bytes")
    ctx = rec.get("cuda_context_bytes")
    if base is None or ctx is None:
        return None
    outside = rec.get("non_allocator_peak_bytes")
    first = allocator_limit_bytes(budget_bytes, baseline_bytes=base, non_allocator_bytes=ctx)
    later = first if outside is None else allocator_limit_bytes(budget_bytes, baseline_bytes=base,
                                                                 non_allocator_bytes=outside,
                                                                 reserve_bytes=REMEASURED_SLACK_BYTES)
    return min(first, later), max(first, later, allocator_limit_bytes(budget_bytes, baseline_bytes=base,
                                                                        non_allocator_bytes=ctx,
                                                                        reserve_bytes=0))


def verdict(rec: dict[str, Any], budget_bytes: int) -> Observation | None:
    """The reuse rule (module docstring) for one record and one budget."""
    status = rec.get("status")
    spec = rec.get("spec") or {}
    b0 = spec.get("vram_budget_bytes")
    L, cid = int(rec["seq_len"]), str(rec.get("cell_id", ""))
    here = budget_label(budget_bytes)
    if status == "oom":
        if b0 is None or b0 >= budget_bytes:
            where = "without a budget" if b0 is None else f"at {budget_label(b0)}"
            return Observation(L, False, cid, f"ran out of memory {where}")
        return None
    if status != "ok":
        return None
    if b0 is not None and b0 <= budget_bytes:
        return Observation(L, True, cid, "ran under this budget" if b0 == budget_bytes
                           else f"ran under a smaller budget ({budget_label(b0)})")
    lim = _limits(rec, budget_bytes)
    if lim is None:
        return None
    alloc, reserved, nvml = (rec.get("torch_peak_allocated_bytes"), rec.get("torch_peak_reserved_bytes"),
                             rec.get("peak_vram_bytes"))
    if alloc is not None and alloc > lim[1]:
        return Observation(L, False, cid, f"its live tensors ({alloc / GIB:.2f} GiB) exceed the allocator limit "
                                          f"at {here} ({lim[1] / GIB:.2f} GiB)")
    steps = int(spec.get("warmup_steps", 0)) + int(spec.get("steps", 0))
    if (steps >= 2 and reserved is not None and nvml is not None and reserved <= lim[0]
            and nvml <= budget_bytes - REUSE_MARGIN_BYTES):
        return Observation(L, True, cid, f"its peaks (torch reserved {reserved / GIB:.2f} GiB, NVML "
                                         f"{nvml / GIB:.2f} GiB) never reach the limits of {here}")
    return None


@dataclass(frozen=True)
class Grid:
    granularity: int
    max_seq_len: int

    def __post_init__(self) -> None:
        if self.granularity < 1:
            raise ValueError("granularity must be >= 1")
        if self.max_seq_len < self.granularity:
            raise ValueError(f"the longest length ({self.max_seq_len}) is below one step ({self.granularity})")

    @property
    def lo(self) -> int:
        return self.granularity

    @property
    def hi(self) -> int:
        return (self.max_seq_len // self.granularity) * self.granularity

    def floor(self, n: int) -> int | None:
        """Largest grid length <= n (None below the grid)."""
        return None if n < self.lo else min(self.hi, (n // self.granularity) * self.granularity)

    def ceil(self, n: int) -> int | None:
        """Smallest grid length >= n (None above the grid)."""
        c = -(-n // self.granularity) * self.granularity
        return None if c > self.hi else max(self.lo, c)


@dataclass(frozen=True)
class Bracket:
    """Known-fitting and known-failing grid lengths for one (row, budget)."""

    grid: Grid
    fit: Observation | None
    fail: Observation | None

    @property
    def lo(self) -> int | None:
        return None if self.fit is None else self.grid.floor(self.fit.seq_len)

    @property
    def hi(self) -> int | None:
        return None if self.fail is None else self.grid.ceil(self.fail.seq_len)

    @property
    def status(self) -> str:
        """found / oom / at_cap / inconsistent / open."""
        lo, hi = self.lo, self.hi
        if self.fit and self.fail and self.fit.seq_len >= self.fail.seq_len:
            return "inconsistent"
        if hi is not None and hi <= self.grid.lo:
            return "oom"
        if lo is not None and lo >= self.grid.hi:
            return "at_cap"
        if lo is not None and hi is not None and hi - lo <= self.grid.granularity:
            return "found"
        return "open"

    @property
    def longest(self) -> int | None:
        return self.lo if self.status in ("found", "at_cap") else None


def bracket(observations: Iterable[Observation], grid: Grid) -> Bracket:
    """Longest fitting and shortest failing observation (the tightest bracket)."""
    fit = fail = None
    for o in observations:
        if o.fits and (fit is None or o.seq_len > fit.seq_len):
            fit = o
        if not o.fits and (fail is None or o.seq_len < fail.seq_len):
            fail = o
    return Bracket(grid, fit, fail)


def next_probe(br: Bracket, guess: int | None, history: list[tuple[int, bool]]) -> int | None:
    """The next length to measure for an open bracket, or None when it is decided.

    Exponential search from the model's guess: the first probe is the guess; while the
    results point the same way the step doubles (1, 2, 4... grid steps); once they have
    pointed both ways the bracket is bisected. An exact guess costs two cells (the guess
    fits, one step more fails); a guess d steps off costs O(log d) more.
    """
    if br.status != "open":
        return None
    g = br.grid.granularity
    a = br.grid.lo if br.lo is None else br.lo + g
    b = br.grid.hi if br.hi is None else br.hi - g

    def clamp(n: int) -> int:
        return max(a, min(b, (n // g) * g))

    if not history:
        return clamp(guess if guess is not None else DEFAULT_START)
    turned = any(h[1] != history[-1][1] for h in history)
    if turned and br.lo is not None and br.hi is not None:
        return clamp(br.lo + ((br.hi - br.lo) // (2 * g)) * g)
    run = 0
    for h in reversed(history):
        if h[1] != history[-1][1]:
            break
        run += 1
    step = g * 2 ** (run - 1)
    last = history[-1][0]
    return clamp(last + step if history[-1][1] else last - step)


def fragmentation_margin(pairs: Iterable[tuple[dict[str, Any], Any]]) -> float:
    """Bytes beyond the model's live-tensor prediction a cell needs at the allocator's cap
    (fragmentation, caching), learned from cells that ran under a budget, each paired
    with its row's model: a fit at L bounds it from above by ``limit - predicted(L)``, an
    OOM from below. One figure per host (it is the allocator's behaviour more than the
    row's). Used for guesses only; the answers come from cells."""
    upper, lower = [], []
    for r, model in pairs:
        limit = r.get("allocator_limit_bytes")
        if model is None or limit is None or r.get("status") not in ("ok", "oom"):
            continue
        slack = limit - model.predict(int(r["seq_len"]), int(r.get("batch_size") or 1))
        (upper if r["status"] == "ok" else lower).append(slack)
    hi = min(upper) if upper else None
    lo = max(lower) if lower else None
    if hi is not None and lo is not None and lo < hi:
        return (lo + hi) / 2
    if hi is not None:
        return min(float(DEFAULT_FRAGMENTATION_BYTES), hi)
    if lo is not None:
        return max(float(DEFAULT_FRAGMENTATION_BYTES), lo + DEFAULT_FRAGMENTATION_BYTES / 2)
    return float(DEFAULT_FRAGMENTATION_BYTES)


def guess_longest(model, budget_bytes: int, grid: Grid, *, batch_size: int = 1, baseline_bytes: int | None = None,
                  non_allocator_bytes: int | None = None, margin_bytes: float = DEFAULT_FRAGMENTATION_BYTES) -> int | None:
    """The model's longest grid length under a budget (a prediction); 0 when even the
    shortest is predicted not to fit (a search then probes the shortest); None without
    a model."""
    if model is None:
        return None
    limit = allocator_limit_bytes(budget_bytes,
                                  baseline_bytes=DEFAULT_BASELINE_BYTES if baseline_bytes is None else baseline_bytes,
                                  non_allocator_bytes=(DEFAULT_NON_ALLOCATOR_BYTES if non_allocator_bytes is None
                                                       else non_allocator_bytes),
                                  reserve_bytes=REMEASURED_SLACK_BYTES)
    n = model.longest_within(limit - margin_bytes, batch_size=batch_size, granularity=grid.granularity,
                             max_seq_len=grid.hi)
    return n
