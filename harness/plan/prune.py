"""Pruning cells that must run out of memory. Pure module.

If a cell ran out of memory, every cell of the same row (same model, precision,
checkpointing mode, batch size and all other settings) with a longer sequence needs at
least as much memory: activations grow with length, weights and optimizer state do not
shrink. Such a cell is recorded as ``oom`` with ``pruned: true`` instead of being run
(``--no-prune`` runs it anyway). Only measured OOMs prune; a pruned cell never prunes
another (the rule is applied against measured records only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from harness.core.spec import CellSpec


def row_key(cell: CellSpec) -> CellSpec:
    """The cell with its length blanked: cells that differ only in length share it."""
    return dataclasses.replace(cell, seq_len=2)


def pruned_by(cell: CellSpec, records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured OOM record that makes ``cell`` certain to run out of memory, or None."""
    key = row_key(cell)
    best = None
    for rec in records:
        if rec.get("status") != "oom" or rec.get("pruned") or "spec" not in rec:
            continue
        try:
            other = CellSpec.from_dict(rec["spec"])
        except Exception:  # a record of another schema: never prune on it
            continue
        if other.seq_len < cell.seq_len and row_key(other) == key:
            if best is None or other.seq_len < CellSpec.from_dict(best["spec"]).seq_len:
                best = rec
    return best


def pruned_record(cell: CellSpec, cause: dict[str, Any]) -> dict[str, Any]:
    """The worker half of a record for a pruned cell."""
    return {
        "status": "oom",
        "pruned": True,
        "pruned_by": cause.get("cell_id"),
        "error": f"pruned: {cause.get('cell_id')} (shorter) already ran out of memory; not run (--no-prune runs it)",
    }
