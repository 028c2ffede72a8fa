"""Do two runs of the same cells agree (serial against parallel, host against host)? Pure module:
frames in, verdicts and text out; no torch.

Running cells in parallel must not change what a cell measures: ``lora-harness agree
RUN_A RUN_B`` puts each cell's tokens/s and peak memory from both runs side by side, with
the relative difference and a verdict, and the two runs' cells per hour above them.

A metric *agrees* when the relative difference is within its tolerance (default 5% for
tokens/s, 3% for peak memory), or when one run's value lies inside the other's spread of
repeated measurements (for tokens/s the per-step values of the measured steps, as in
``harness.report.compare``): two runs cannot be told apart more finely than a run repeats itself.
Otherwise it *differs*. Cells are matched by id and GPU model: a cell measured on
different GPU models is never compared. Memory is VRAM (NVML) on GPUs and peak RSS on
CPUs (``memory_bytes``); torch's peak allocated bytes, exact and blind to other
processes, are compared too where both runs have them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from harness.report.compare import Side, side
from harness.report.units import fmt

DEFAULT_TOLERANCES: dict[str, float] = {"tokens_per_s": 0.05, "memory_bytes": 0.03, "torch_peak_allocated_bytes": 0.01}
LABELS = {"tokens_per_s": "tokens/s", "memory_bytes": "peak memory", "torch_peak_allocated_bytes": "torch peak allocated"}


class AgreeError(ValueError):
    """Unusable input: no cell in common, a malformed tolerance."""


@dataclass(frozen=True)
class MetricAgreement:
    cell_id: str
    gpu_model: str
    metric: str
    a: Side
    b: Side
    rel: float | None
    verdict: str  # agree, differ, not measured
    note: str = ""


def parse_tolerances(texts: Sequence[str] | None) -> dict[str, float]:
    """``['tokens_per_s:5%', 'memory_bytes:2%']`` -> fractions (defaults for the rest)."""
    out = dict(DEFAULT_TOLERANCES)
    for text in texts or ():
        for part in str(text).split(","):
            if not part.strip():
                continue
            name, _, amount = part.partition(":")
            amount = amount.strip()
            try:
                value = float(amount.rstrip("%")) / (100.0 if amount.endswith("%") else 1.0)
            except ValueError:
                raise AgreeError(f"tolerance {part.strip()!r} is not METRIC:N% (e.g. tokens_per_s:5%)") from None
            if value < 0 or not name.strip():
                raise AgreeError(f"tolerance {part.strip()!r} is not METRIC:N% (e.g. tokens_per_s:5%)")
            out[name.strip()] = value
    return out


def _keyed(records: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    ok = records[records["status"] == "ok"]
    model = ok["gpu_model"] if "gpu_model" in ok.columns else pd.Series("?", index=ok.index)
    return {(str(c), str(g)): grp for (c, g), grp in ok.groupby([ok["cell_id"], model.fillna("?")], sort=False)}


def judge(cell_id: str, gpu: str, metric: str, a: Side, b: Side, tol: float) -> MetricAgreement:
    if a.value is None or b.value is None:
        return MetricAgreement(cell_id, gpu, metric, a, b, None, "not measured")
    rel = (b.value - a.value) / abs(a.value) if a.value else (0.0 if b.value == a.value else math.inf)
    if abs(rel) <= tol:
        return MetricAgreement(cell_id, gpu, metric, a, b, rel, "agree")
    if a.contains(b.value) or b.contains(a.value):
        which = "first" if a.contains(b.value) else "second"
        spread = a if which == "first" else b
        return MetricAgreement(cell_id, gpu, metric, a, b, rel, "agree",
                               f"inside the {which} run's spread ({spread.samples} measurements)")
    return MetricAgreement(cell_id, gpu, metric, a, b, rel, "differ")


def agreement(a: pd.DataFrame, b: pd.DataFrame, tolerances: dict[str, float] | None = None) -> list[MetricAgreement]:
    """Every cell ok in both runs (frames of every record, as ``load_run_set().records``),
    judged on each metric of ``tolerances`` that either run holds."""
    tol = dict(DEFAULT_TOLERANCES, **(tolerances or {}))
    ka, kb = _keyed(a), _keyed(b)
    common = [k for k in ka if k in kb]  # the first run's order (a serial run's: the matrix's)
    if not common:
        raise AgreeError(f"no cell is ok in both runs on the same GPU model ({len(ka)} and {len(kb)} ok cells)")
    metrics = [m for m in tol if m in a.columns and m in b.columns and (a[m].notna().any() or b[m].notna().any())]
    out = []
    for cell_id, gpu in common:
        for m in metrics:
            out.append(judge(cell_id, gpu, m, side(ka[(cell_id, gpu)], m), side(kb[(cell_id, gpu)], m), tol[m]))
    return out


def _value(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric == "tokens_per_s":
        return f"{v:,.0f}"
    return fmt("peak_vram_bytes", v)


def table(results: Sequence[MetricAgreement]) -> tuple[list[str], list[list[str]]]:
    """One row per cell: each metric's two values, the difference and the verdict."""
    metrics = list(dict.fromkeys(r.metric for r in results))
    rows: dict[tuple[str, str], list[str]] = {}
    for r in results:
        row = rows.setdefault((r.cell_id, r.gpu_model), [r.cell_id, r.gpu_model])
        diff = "-" if r.rel is None else f"{100 * r.rel:+.1f}%"
        verdict = r.verdict + (" (spread)" if r.note else "")
        row += [_value(r.metric, r.a.value), _value(r.metric, r.b.value), diff, verdict]
    heads = ["cell", "GPU model"]
    for m in metrics:
        label = LABELS.get(m, m)
        heads += [f"{label} A", f"{label} B", "B vs A", "verdict"]
    return heads, list(rows.values())


def summary(results: Sequence[MetricAgreement], tolerances: dict[str, float]) -> list[str]:
    lines = []
    for m in dict.fromkeys(r.metric for r in results):
        rs = [r for r in results if r.metric == m and r.verdict != "not measured"]
        if not rs:
            continue
        agree = [r for r in rs if r.verdict == "agree"]
        spread = [r for r in agree if r.note]
        worst = max((abs(r.rel) for r in rs if r.rel is not None and math.isfinite(r.rel)), default=0.0)
        lines.append(f"{LABELS.get(m, m)}: {len(agree)}/{len(rs)} cells agree (within {100 * tolerances[m]:g}%"
                     f"{f', {len(spread)} of them inside the per-step spread' if spread else ''}); "
                     f"largest difference {100 * worst:.1f}%")
    return lines
