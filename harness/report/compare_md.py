"""The regression report (markdown) of a ``harness.report.compare.Comparison``, and its
one-line summary for terminals. Pure: values in, text out."""

from __future__ import annotations

from typing import Sequence

from harness.report.compare import CellVerdict, Comparison, MetricVerdict, Side
from harness.report import pages
from harness.report.pages import Block, Bullets, Heading, Para
from harness.report.units import fmt, fmt_change, unit_for


def summary_line(cmp: Comparison) -> str:
    regs = cmp.regressions
    if not regs:
        noise = sum(1 for m in cmp.metrics if m.verdict == "noise")
        tail = f"; {noise} change(s) past a threshold were inside the measurement spread (noise)" if noise else ""
        if cmp.unstable:
            cells = len({m.cell_id for m in cmp.unstable})
            return (f"UNSTABLE: no regression found, but {len(cmp.unstable)} change(s) in {cells} unstable cell(s) "
                    f"cannot be told from noise ({cmp.compared} cells compared){tail}")
        return f"no regression: {cmp.compared} cells compared{tail}"
    n_metric = sum(1 for r in regs if isinstance(r, MetricVerdict))
    n_cell = len(regs) - n_metric
    parts = [f"{n_metric} metric regression(s)" if n_metric else "", f"{n_cell} cell status regression(s)" if n_cell else ""]
    return f"REGRESSION: {' and '.join(p for p in parts if p)} in {cmp.compared} compared cells"


def regression_lines(cmp: Comparison, limit: int = 20) -> list[str]:
    """One line per regression, for a terminal."""
    out = []
    for r in cmp.regressions[:limit]:
        if isinstance(r, MetricVerdict):
            m = r.threshold.metric
            out.append(f"  {r.cell_id}: {m} {fmt(m, r.baseline.value)} -> {fmt(m, r.current.value)} "
                       f"({fmt_change(r.change_rel, r.change_abs, m)}; threshold {r.threshold.text})")
        else:
            out.append(f"  {r.cell_id}: {r.kind} {r.baseline_status or '-'} -> {r.current_status or '-'}"
                       + (f" ({r.note})" if r.note else ""))
    if len(cmp.regressions) > limit:
        out.append(f"  ... and {len(cmp.regressions) - limit} more (see the report)")
    for m in cmp.unstable[:limit]:
        out.append(f"  {m.cell_id}: {m.threshold.metric} {fmt(m.threshold.metric, m.baseline.value)} -> "
                   f"{fmt(m.threshold.metric, m.current.value)}: unstable ({m.note})")
    return out


def _band(metric: str, s: Side) -> str:
    if s.low is None:
        return "single"
    u = unit_for(metric)
    return f"{u.convert(s.low):,.{u.digits}f}-{u.convert(s.high):,.{u.digits}f} {u.label} ({s.samples})"


def _metric_row(v: MetricVerdict, with_metric: bool) -> list[str]:
    m = v.threshold.metric
    head = [v.cell_id] + ([m] if with_metric else [])
    verdict = v.verdict.upper() if v.verdict == "regression" else v.verdict
    return head + [fmt(m, v.baseline.value), fmt(m, v.current.value), fmt_change(v.change_rel, v.change_abs, m),
                   verdict, _band(m, v.baseline), _band(m, v.current), v.note]


def _cell_row(v: CellVerdict) -> list[str]:
    def show(s: str | None) -> str:
        return "-" if s is None else ("OOM" if s == "oom" else s)

    verdict = v.verdict.upper() if v.verdict == "regression" else v.verdict
    return [v.cell_id, v.kind, show(v.baseline_status), show(v.current_status), verdict, v.note]


def report_blocks(cmp: Comparison, baseline_label: str, current_label: str,
                  extra_warnings: Sequence[str] = ()) -> list[Block]:
    line = summary_line(cmp)
    blocks: list[Block] = [Para(line, "verdict-bad" if cmp.regressed else "verdict-ok"),
                           Bullets((f"baseline: {baseline_label}", f"current: {current_label}"))]
    blocks += [Para(w, "warning") for w in (*extra_warnings, *cmp.warnings)]
    blocks.append(Heading("Thresholds"))
    blocks.append(Bullets(tuple(t.describe() for t in cmp.thresholds) + (
        "a status that gets worse (ok -> OOM / unsupported / failure, or OOM -> failure) is a regression",
        "noise: past the threshold but inside the spread of repeated measurements (per-step values of step "
        "time, tokens/s and MFU; any metric with several records of a cell on a side)",
        "memory peaks are one measurement per record: with one record a side they are judged by the threshold "
        "alone (spread column 'single')",
    )))
    metric_heads = ["baseline", "current", "change", "verdict", "baseline spread (n)", "current spread (n)", "note"]
    regs = [v for v in cmp.metrics if v.verdict == "regression"]
    blocks.append(Heading("Metric regressions"))
    blocks.append(pages.table(["cell", "metric", *metric_heads], [_metric_row(v, True) for v in regs]))
    cell_heads = ["cell", "change", "baseline status", "current status", "verdict", "note"]
    status = [v for v in cmp.cells if v.kind == "status"]
    blocks.append(Heading("Status changes"))
    blocks.append(pages.table(cell_heads, [_cell_row(v) for v in status]))
    moved = [v for v in cmp.cells if v.kind != "status"]
    blocks.append(Heading("Cells added or removed"))
    blocks.append(pages.table(cell_heads, [_cell_row(v) for v in moved]))
    blocks.append(Heading("Every compared cell"))
    for t in cmp.thresholds:
        rows = [_metric_row(v, False) for v in cmp.metrics if v.threshold is t]
        blocks.append(Heading(f"{t.metric} ({t.text})", 3))
        blocks.append(pages.table(["cell", *metric_heads], rows,
                                  "" if rows else "No cell finished on both sides."))
    return blocks


def to_markdown(cmp: Comparison, baseline_label: str, current_label: str, extra_warnings: Sequence[str] = ()) -> str:
    return pages.to_markdown("Regression report", report_blocks(cmp, baseline_label, current_label, extra_warnings))
