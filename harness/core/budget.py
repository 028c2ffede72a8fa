"""VRAM budgets: parsing sizes, naming them in cell ids, and the allocator limit a budget
implies. Pure module (no torch): both the parent (option checks, the fit search) and the
worker (enforcement, ``harness.cell.budget_guard``) use these functions, so the limit a cell
ran under and the limit the search reasons with are the same formula.

Units. ``GiB`` / ``MiB`` / ``KiB`` / ``TiB`` are binary, ``GB`` / ``MB`` / ``KB`` / ``TB``
are SI (powers of ten), exactly as written. A bare number is GiB, because a GPU sold as
"24 GB" has 24 GiB of memory (an RTX 4090 reports 24,564 MiB); the single letters ``G``,
``M``, ``K``, ``T`` are read as binary for the same reason.

What a budget means (``README``, "Will it fit?"): the emulated card has ``budget`` bytes
in all. The device's idle usage before the cell (NVML's reading before the worker touches
CUDA; 0.60 GiB on the H200) counts against it, as a real card's idle usage would, and so
does the memory the worker's CUDA context and libraries hold outside PyTorch's allocator.
PyTorch's caching allocator gets the rest:

    allocator limit = budget - baseline - non-allocator bytes - reserve

and after the cell NVML's peak must not exceed the budget.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from harness.core.errors import SpecError

KIB, MIB, GIB, TIB = 1024, 1024 ** 2, 1024 ** 3, 1024 ** 4

_UNITS: dict[str, int] = {
    "b": 1,
    "kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB,
    "k": KIB, "m": MIB, "g": GIB, "t": TIB,
    "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

# Device memory held outside the allocator that appears only during the first training
# step (lazily loaded CUDA modules of torch, bitsandbytes and the attention kernels; on
# the H200 reference run NVML over baseline exceeded torch's reserved peak by 0.75-0.90
# GiB at the end of a cell, context included). Reserved for step 1 (a warm-up step
# without the optimizer state, so it needs ~0.3 GiB less than later steps on an 8B
# model); from step 2 on the worker measures the real figure and re-sets the limit
# (``harness.cell.budget_guard``). The post-cell NVML check catches any shortfall.
INITIAL_RESERVE_BYTES = 512 * MIB
# Headroom kept when the limit is re-set from a measurement (NVML reads can lag).
REMEASURED_SLACK_BYTES = 64 * MIB


class BudgetError(SpecError):
    """A budget a user wrote cannot be used (not a size, zero, larger than the device)."""


def parse_size_bytes(text: str | int | float, *, what: str = "--vram-budget") -> int:
    """``'24GiB'`` -> 25769803776; ``'24GB'`` -> 24000000000; ``'24'`` -> 24 GiB."""
    if isinstance(text, bool):
        raise BudgetError(f"{what}: {text!r} is not a size")
    if isinstance(text, (int, float)):
        number, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise BudgetError(f"{what}: {text!r} is not a size; write e.g. 24GiB, 24GB or 24000MiB")
        number, unit = float(m.group(1)), m.group(2).lower()
    factor = GIB if unit == "" else _UNITS.get(unit)
    if factor is None:
        raise BudgetError(f"{what}: unknown unit {unit!r} in {text!r}; use GiB, MiB, GB or MB")
    size = int(round(number * factor))
    if size <= 0:
        raise BudgetError(f"{what}: {text!r} is not a positive size")
    return size


def parse_budgets(value: str | Iterable[Any] | None, *, what: str = "--budgets") -> list[int]:
    """A comma list of sizes -> sorted, de-duplicated byte counts ([] for None)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [s for v in value for s in str(v).split(",")]
    out = {parse_size_bytes(s, what=what) for s in items if str(s).strip()}
    if not out and isinstance(value, str) and value.strip():
        raise BudgetError(f"{what}: no size in {value!r}")
    return sorted(out)


def budget_label(size_bytes: int) -> str:
    """Compact exact label for ids and tables: ``24GiB``, ``23040MiB``, ``24000000000B``."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB")):
        if size_bytes % unit == 0:
            return f"{size_bytes // unit}{name}"
    return f"{size_bytes}B"


def allocator_limit_bytes(budget_bytes: int, *, baseline_bytes: int, non_allocator_bytes: int,
                          reserve_bytes: int = INITIAL_RESERVE_BYTES) -> int:
    """What PyTorch's caching allocator may hold (reserved bytes) under ``budget_bytes``.

    ``baseline_bytes``: NVML's device usage before the worker touched CUDA.
    ``non_allocator_bytes``: device memory the worker holds outside the allocator (the
    CUDA context at first, the measured figure later). May be <= 0: the budget cannot
    even hold the context, and every cell is out of memory.
    """
    return int(budget_bytes - baseline_bytes - non_allocator_bytes - reserve_bytes)


