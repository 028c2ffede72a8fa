"""The fit search's report: ``fit.json``, ``fit.md`` and ``fit.png`` in the run folder, and
the table for the terminal. Measured answers and the memory model's predictions are
kept in separate tables, and predictions always say so. Parent side (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.fit import memmodel
from harness.core.budget import GIB, MIB, budget_label
from harness.fit.search import MODEL_METRIC, FitSearch, row_label
from harness.core.fmt import fmt_duration, format_table, markdown_table


def answer_text(status: str, longest: int | None, grid_hi: int) -> str:
    if status == "found":
        return f"{longest:,}"
    if status == "oom":
        return "OOM"
    if status == "at_cap":
        return f">={grid_hi:,} (cap)"
    return {"incomplete": "not measured (time limit)", "open": "not measured", "error": "error",
            "unsupported": "unsupported", "inconsistent": "inconsistent"}.get(status, status)


def build(search: FitSearch) -> dict[str, Any]:
    """Everything the search found, as JSON-able data."""
    rows_out = []
    for key, row in search.rows.items():
        grid = search.grid(row)
        answers = [a for (k, _b), a in sorted(search.answers.items(), key=lambda kv: kv[0][1]) if k == key]
        recs = search.row_records(row)
        model_info: dict[str, Any] = {}
        for metric in (MODEL_METRIC, "peak_vram_bytes"):
            pts = memmodel.points_from_records(recs, metric)
            m = search.model(row, metric) if metric == MODEL_METRIC else _fit_or_none(pts, metric, row)
            if m is None:
                continue
            quad = m.quadratic
            loo = memmodel.leave_one_out(pts, metric=metric, quadratic=quad)
            hl = memmodel.holdout_longest(pts, metric=metric, quadratic=quad)
            model_info[metric] = {**m.to_dict(), "fitted_on_prior": not set(m.cells) <= {p.cell_id for p in pts},
                                  "leave_one_out": [h.to_dict() for h in loo],
                                  "holdout_longest": None if hl is None else hl.to_dict()}
        preds = []
        for a in answers:
            before = search.predicted.get((key, a.budget_bytes)) or {}
            preds.append({"budget_bytes": a.budget_bytes, "before_search": before,
                          "predicted_longest": search.guess(row, a.budget_bytes, capped=False)})
        probes = [r for r in recs if (r.get("spec") or {}).get("vram_budget_bytes") and r.get("status") == "ok"]
        worst = max(probes, key=lambda r: (r.get("peak_vram_bytes") or 0) / r["spec"]["vram_budget_bytes"],
                    default=None)
        rows_out.append({
            "row": row_label(row), "model": row.model, "precision": row.precision, "grad_ckpt": row.grad_ckpt,
            "batch_size": row.batch_size, "stack": row.stack, "compile": row.compile,
            "attn_implementation": row.attn_implementation, "granularity": grid.granularity, "max_seq_len": grid.hi,
            "answers": [a.to_dict() for a in answers], "predictions": preds, "memory_model": model_info,
            "budget_cells_ok": len(probes),
            "budget_cells_nvml_within": sum(1 for r in probes if r.get("nvml_peak_within_budget")),
            "worst_nvml_peak_fraction_of_budget": None if worst is None else
            (worst.get("peak_vram_bytes") or 0) / worst["spec"]["vram_budget_bytes"],
        })
    return {"rows": rows_out, "budgets_bytes": list(search.settings.budgets_bytes),
            "search": {"cells_run": search.cells_run, "cells_reused": search.cells_reused,
                       "cell_wall_time_s": search.cell_time_s, "elapsed_s": search.elapsed_s(),
                       "time_limit_s": search.settings.time_limit_s},
            "prior_runs": list(search.settings.prior_dirs),
            "note": "answers are measured (probe cells under each budget, or the reuse rule of harness/fit/rules.py); "
                    "predictions come from the memory model and were not run"}


def _fit_or_none(pts, metric, row):
    try:
        return memmodel.fit(pts, metric=metric, quadratic=memmodel.wants_quadratic(row.attn_implementation))
    except memmodel.ModelError:
        return None


def _grid(data: dict[str, Any]) -> tuple[list[str], list[int]]:
    return [r["row"] for r in data["rows"]], list(data["budgets_bytes"])


def measured_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    heads, budgets = _grid(data)
    rows = []
    for b in budgets:
        line = [f"{b / GIB:g} GiB"]
        for r in data["rows"]:
            a = next((x for x in r["answers"] if x["budget_bytes"] == b), None)
            line.append("-" if a is None else answer_text(a["status"], a["longest"], r["max_seq_len"]))
        rows.append(line)
    return ["VRAM budget"] + heads, rows


def predicted_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    heads, budgets = _grid(data)
    rows = []
    for b in budgets:
        line = [f"{b / GIB:g} GiB"]
        for r in data["rows"]:
            p = next((x["predicted_longest"] for x in r["predictions"] if x["budget_bytes"] == b), None)
            line.append("no model" if p is None else "OOM (predicted)" if p == 0 else f"~{p:,} (predicted)")
        rows.append(line)
    return ["VRAM budget"] + heads, rows


def before_search_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Each memory model's prediction, made before the search ran a cell of the row under
    the budget, beside the measured answer and its error (harness.fit.evaluate)."""
    rows = []
    for r in data["rows"]:
        for pr in r["predictions"]:
            before = pr.get("before_search") or {}
            a = next((x for x in r["answers"] if x["budget_bytes"] == pr["budget_bytes"]), None)
            if not before or a is None:
                continue
            measured = a["longest"] if a["status"] == "found" else None
            cols = []
            for m in ("allocated", "reserved"):
                v = before.get(m)
                err = f" ({(v - measured) / measured:+.0%})" if v is not None and measured else ""
                cols.append("-" if v is None else f"{v:,}{err}")
            rows.append([r["row"], f"{pr['budget_bytes'] / GIB:g} GiB",
                         answer_text(a["status"], a["longest"], r["max_seq_len"]), *cols])
    return ["row", "budget", "measured", "allocated + 512 MiB", "allocated + gap to reserved"], rows


def text(data: dict[str, Any]) -> str:
    s = data["search"]
    h, rows = measured_table(data)
    out = ["Longest trainable context (tokens), measured:", format_table(h, rows)]
    if any(r["predictions"] for r in data["rows"]):
        ph, prow = predicted_table(data)
        out += ["", "Memory model predictions (not measured):", format_table(ph, prow)]
    out.append(f"\nsearch: {s['cells_run']} cells run, {s['cells_reused']} reused, cells {fmt_duration(s['cell_wall_time_s'])}"
               f", elapsed {fmt_duration(s['elapsed_s'])}")
    return "\n".join(out)


def markdown(data: dict[str, Any], title: str) -> str:
    s = data["search"]
    h, rows = measured_table(data)
    ph, prow = predicted_table(data)
    md = [f"# {title}", "", "## Longest trainable context (tokens), measured", "",
          "Each entry is the longest length (a multiple of the granularity) that trained without running out of "
          "memory under the budget, with the next length confirmed to fail; `OOM`: even the shortest failed; "
          "`>=N (cap)`: the search's longest length fitted.", "", markdown_table(h, rows), "",
          "## Memory model predictions (not measured)", "", markdown_table(ph, prow), "",
          "## Predicted before the search, against the answer", "",
          "Made before any cell of the row ran under the budget, from its cells without a budget "
          "(harness.fit.evaluate); the error is the prediction's against the measured answer.", "",
          markdown_table(*before_search_table(data)), "",
          f"Search: {s['cells_run']} cells run, {s['cells_reused']} reused from the run folder; cells took "
          f"{fmt_duration(s['cell_wall_time_s'])}, the search {fmt_duration(s['elapsed_s'])}.", "",
          "## Memory model per row", "", markdown_table(
              ["row", "metric", "fixed", "per token", "cells", "held-out longest: measured / predicted / error"],
              [_model_row(r, metric, info) for r in data["rows"] for metric, info in r["memory_model"].items()]),
          "", "## Budget check (NVML)", "", markdown_table(
              ["row", "budget cells ok", "NVML peak within budget", "highest NVML peak / budget"],
              [[r["row"], r["budget_cells_ok"], r["budget_cells_nvml_within"],
                "-" if r["worst_nvml_peak_fraction_of_budget"] is None
                else f"{100 * r['worst_nvml_peak_fraction_of_budget']:.1f}%"] for r in data["rows"]]),
          "", "## Evidence", ""]
    for r in data["rows"]:
        for a in r["answers"]:
            fit = a["fit"]
            fail = a["fail"]
            md.append(f"- {r['row']} @ {budget_label(a['budget_bytes'])}: "
                      f"{answer_text(a['status'], a['longest'], r['max_seq_len'])}"
                      + (f"; fits s{fit['seq_len']}: `{fit['cell_id']}` ({fit['why']})" if fit else "")
                      + (f"; fails s{fail['seq_len']}: `{fail['cell_id']}` ({fail['why']})" if fail else "")
                      + (f"; {a['message']}" if a["message"] else ""))
    return "\n".join(md) + "\n"


def _model_row(r: dict[str, Any], metric: str, info: dict[str, Any]) -> list[str]:
    hl = info.get("holdout_longest")
    held = "-" if not hl else (f"s{hl['seq_len']}: {hl['measured_bytes'] / GIB:.2f} / {hl['predicted_bytes'] / GIB:.2f}"
                               f" GiB ({100 * hl['rel_error']:+.1f}%)")
    return [r["row"], metric, f"{info['fixed_bytes'] / GIB:.2f} GiB", f"{info['per_token_bytes'] / MIB:.3f} MiB",
            str(info["n_points"]) + (" (with prior runs)" if info.get("fitted_on_prior") else ""), held]


def chart(data: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(data["rows"]):
        color = f"C{i}"
        xs, ys = [], []
        for a in r["answers"]:
            x = a["budget_bytes"] / GIB
            if a["status"] == "found":
                xs.append(x)
                ys.append(a["longest"])
            elif a["status"] == "at_cap":  # a lower bound: a marker, not a point of the line
                ax.scatter([x], [a["longest"]], marker="^", s=60, color=color, zorder=3)
            elif a["status"] == "oom":
                ax.scatter([x], [0], marker="x", color=color, zorder=3)
        ax.plot(xs, ys, "o-", color=color, label=f"{r['row']} (measured)")
        px = [p["budget_bytes"] / GIB for p in r["predictions"] if p["predicted_longest"] is not None]
        py = [p["predicted_longest"] for p in r["predictions"] if p["predicted_longest"] is not None]
        if px:
            ax.plot(px, py, "--", color=color, alpha=0.5, label=f"{r['row']} (model prediction)")
    ax.set_xlabel("VRAM budget (GiB)")
    ax.set_ylabel("longest trainable context (tokens)")
    ax.set_title(title + "\n(x: OOM at the shortest length; ^: the search's cap fitted, the longest is at least "
                 "that)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(search: FitSearch, run_dir: str | Path, title: str) -> dict[str, Any]:
    """fit.json, fit.md and fit.png into the run folder; returns the data."""
    d = Path(run_dir)
    data = build(search)
    (d / "fit.json").write_text(json.dumps(data, indent=2, default=str))
    (d / "fit.md").write_text(markdown(data, title))
    chart(data, d / "fit.png", title)
    return data
