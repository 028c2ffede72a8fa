"""How well the memory models predict the longest context, on measured answers.

For each measured answer (a row and a budget whose longest fitting length the search
found), the prediction is made the way the search makes it before it has run any cell
of that row under a budget: from the row's cells without a budget only (the matrix cells
of the same or a prior run). Two models are compared:

- ``allocated``: live tensors (``torch_peak_allocated_bytes``) plus a fixed 512 MiB for
  fragmentation (the search's model until the reserved-bytes model existed);
- ``reserved``: allocated plus the whole fragmentation gap to the unconstrained reserved
  peak (``harness.fit.memmodel.NeedModel`` with ``f = 1``): an upper bound of the need;
- ``calibrated``: the same with the gap fraction ``f`` calibrated on the row's cells under
  smaller budgets (the search answers budgets smallest first, so these are what it knows
  before it runs a cell at this budget), ``f = 1`` without them.

The error is ``(predicted - measured) / measured``; an answer at the search's cap has no
measured longest and is compared as a bound (a prediction at or beyond the cap agrees).
Pure module (no torch, no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from harness.core.spec import CellSpec
from harness.fit import memmodel
from harness.fit import rules as fitlib

TARGET_ERROR = 0.10


@dataclass(frozen=True)
class Prediction:
    row: str
    budget_bytes: int
    status: str  # the answer's: found, oom, at_cap
    measured: int | None
    predicted: dict[str, int | None]  # by model: allocated, reserved, calibrated

    def error(self, which: str) -> float | None:
        pred = self.predicted.get(which)
        if pred is None or not self.measured:  # nothing fits: no relative error (the table shows both)
            return None
        if self.status == "at_cap":
            return 0.0 if pred >= self.measured else (pred - self.measured) / self.measured
        return (pred - self.measured) / self.measured


def _row_key(spec: dict[str, Any]) -> tuple | None:
    """A stored spec's row, with today's defaults for settings it was written without."""
    try:
        return fitlib.row_key(CellSpec.from_dict(spec).to_dict())
    except Exception:  # noqa: BLE001 - a spec of another schema is no row of ours
        return None


def _unbudgeted(records: Iterable[dict[str, Any]], row: CellSpec) -> list[dict[str, Any]]:
    key = fitlib.row_key(row.to_dict())
    return [r for r in records if r.get("spec") and not r["spec"].get("vram_budget_bytes") and r.get("seq_len")
            and _row_key(r["spec"]) == key]


def _smaller_budgets(records: Iterable[dict[str, Any]], row: CellSpec, budget: int) -> list[dict[str, Any]]:
    key = fitlib.row_key(row.to_dict())
    return [r for r in records if r.get("spec") and 0 < (r["spec"].get("vram_budget_bytes") or 0) < budget
            and r.get("seq_len") and _row_key(r["spec"]) == key]


MODELS = ("allocated", "reserved", "calibrated")


def predict(records: list[dict[str, Any]], row: CellSpec, budget: int, grid: fitlib.Grid, *,
            baseline_bytes: int | None = None, non_allocator_bytes: int | None = None) -> dict[str, int | None]:
    """Each model's longest length under ``budget``: fitted on unbudgeted cells, the
    calibrated one's gap fraction on the row's smaller budgets."""
    recs = _unbudgeted(records, row)
    quad = memmodel.wants_quadratic(row.attn_implementation)
    try:
        alloc = memmodel.fit(memmodel.points_from_records(recs, "torch_peak_allocated_bytes"),
                             metric="torch_peak_allocated_bytes", quadratic=quad)
    except memmodel.ModelError:
        return dict.fromkeys(MODELS)
    out: dict[str, int | None] = dict.fromkeys(MODELS)
    out["allocated"] = fitlib.guess_longest(alloc, budget, grid, batch_size=row.batch_size, baseline_bytes=baseline_bytes,
                               non_allocator_bytes=non_allocator_bytes)
    try:
        res = memmodel.fit(memmodel.points_from_records(recs, "torch_peak_reserved_bytes"),
                           metric="torch_peak_reserved_bytes", quadratic=quad)
    except memmodel.ModelError:
        return out
    fractions = {"reserved": 1.0, "calibrated": memmodel.calibrate_gap(alloc, res, _smaller_budgets(records, row, budget))}
    for name, f in fractions.items():
        out[name] = fitlib.guess_longest(memmodel.NeedModel(alloc, res, f), budget, grid, batch_size=row.batch_size,
                                         baseline_bytes=baseline_bytes, non_allocator_bytes=non_allocator_bytes,
                                         margin_bytes=0)
    return out


def evaluate(records: list[dict[str, Any]], answers: Iterable[dict[str, Any]], *,
             granularity: int = 256, max_seq_len: int = 16384) -> list[Prediction]:
    """Predictions for every measured answer (``fit.json`` rows' answers, with their row's
    spec fields ``model``, ``precision``, ``grad_ckpt``, ``batch_size``)."""
    out = []
    for a in answers:
        if a.get("status") not in ("found", "oom", "at_cap"):
            continue
        row = CellSpec(a["model"], a["precision"], 2, grad_ckpt=a["grad_ckpt"], batch_size=int(a.get("batch_size") or 1))
        grid = fitlib.Grid(granularity, max(max_seq_len, 10 ** 6))
        predicted = predict(records, row, int(a["budget_bytes"]), grid)
        measured = a.get("longest") if a["status"] != "at_cap" else max_seq_len
        if a["status"] == "oom":
            measured = 0
        out.append(Prediction(f"{a['precision']} gc-{a['grad_ckpt']}", int(a["budget_bytes"]), a["status"],
                              measured, predicted))
    return out


def markdown(preds: list[Prediction]) -> str:
    """The comparison table, with each model's error and the 10% target."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.1%}"

    def num(x: int | None) -> str:
        return "-" if x is None else f"{x:,}"

    lines = ["| row | budget | measured longest | allocated + 512 MiB | error | reserved (f = 1) | error "
             "| reserved, f from smaller budgets | error |", "|---|---|---|---|---|---|---|---|---|"]
    for p in preds:
        shown = "OOM at the shortest" if p.status == "oom" else (f">= {p.measured:,} (cap)" if p.status == "at_cap"
                                                                  else f"{p.measured:,}")
        cols = " | ".join(f"{num(p.predicted.get(m))} | {pct(p.error(m))}" for m in MODELS)
        lines.append(f"| {p.row} | {p.budget_bytes / 2 ** 30:g} GiB | {shown} | {cols} |")
    found = [p for p in preds if p.status == "found"]
    lines.append("")
    for m in MODELS:
        errs = [abs(e) for p in found if (e := p.error(m)) is not None]
        if errs:
            within = sum(1 for e in errs if e < TARGET_ERROR)
            lines.append(f"- {m}: {within} of {len(errs)} found answers within {TARGET_ERROR:.0%} "
                         f"(largest error {max(errs):.1%})")
    return "\n".join(lines) + "\n"
