"""VRAM budgets of a sweep: every cell once per budget, checked against the host's GPU.
Pure module (no torch)."""

from __future__ import annotations

from typing import Any

from harness.core.budget import GIB, BudgetError, budget_label, parse_budgets

def check_against_device(budget_bytes: int, facts: dict[str, Any], *, what: str = "--vram-budget") -> None:
    """Raise BudgetError when the budget cannot be emulated on this host's first GPU."""
    gpus = facts.get("gpus") or []
    if not facts.get("has_gpu") or not gpus:
        raise BudgetError(f"{what} emulates a smaller GPU on a real one and needs a CUDA device; this host has none "
                          "(lora-harness fit --dry-run gives the memory model's predictions without one)")
    total = int(gpus[0].get("memory_total_bytes") or 0)
    if total and budget_bytes > total:
        raise BudgetError(f"{what} {budget_label(budget_bytes)} ({budget_bytes / GIB:.1f} GiB) is larger than this "
                          f"GPU ({gpus[0].get('name')}, {total / GIB:.1f} GiB): a budget can only make a card smaller")


def apply_vram_budgets(cells: list, raw: str | None, facts: dict[str, Any], use_gpu: bool) -> list:
    """``--vram-budget`` for a sweep: every cell once per budget (ids carry the budget).

    On a host without a CUDA device this is an error, not a skip: a budget is a property
    of GPU memory and a CPU cell under one would measure nothing about it.
    """
    budgets = parse_budgets(raw, what="--vram-budget")
    if not budgets:
        return cells
    for b in budgets:
        check_against_device(b, facts if use_gpu else {"has_gpu": False}, what="--vram-budget")
    return [c.replace(vram_budget_bytes=b) for c in cells for b in budgets]
