"""The same matrix on several GPU models, side by side (runs from many hosts).

``lora-harness report runA runB ...`` over runs made on different GPU models (an H100 box,
an A100 box, a 24 GB consumer card) gets a section where each cell is a row and each GPU
model a pair of columns (tokens/s, peak memory), and a chart per model preset and batch
size with one bar per GPU model for each cell. The GPU model is the record's
``gpu_model`` (``harness.report.load.gpu_model_of``: the CUDA device name, ``cpu`` for a
CPU cell).

The same cell measured more than once on one GPU model (two hosts with the same card, a
rerun) shows its newest record (by timestamp), with the number of records in brackets;
every record stays in the data and the comparison pools them as repeated measurements.
"""

from __future__ import annotations

import matplotlib
import pandas as pd
from matplotlib.patches import Patch
from matplotlib.ticker import StrMethodFormatter

from harness.report.charts import STYLE, Chart, Group, mode_order, new_figure, precision_order, series_labels
from harness.report.units import GIB, fmt

# Bar colours per GPU model, in order of appearance (qualitative palette).
GPU_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def gpu_models(cells: pd.DataFrame) -> list[str]:
    col = cells["gpu_model"] if "gpu_model" in cells.columns else pd.Series(dtype=object)
    return sorted(set(col.dropna().astype(str)), key=lambda m: (m == "cpu", m))


def _cell_order(cells: pd.DataFrame) -> list[str]:
    """Cell ids in the matrix's order: model, precision, checkpointing, batch, length."""
    from harness.core.axes import GRAD_CKPT_MODES, PRECISIONS

    def key(r):
        p = PRECISIONS.index(r["precision"]) if r["precision"] in PRECISIONS else 99
        g = GRAD_CKPT_MODES.index(r["grad_ckpt"]) if r["grad_ckpt"] in GRAD_CKPT_MODES else 99
        return (str(r["model"]), p, g, float(r["batch_size"] or 1), float(r["seq_len"] or 0), str(r["cell_id"]))

    rows = cells.drop_duplicates("cell_id")
    return [r["cell_id"] for _, r in sorted(rows.iterrows(), key=lambda t: key(t[1]))]


def newest(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (GPU model, cell): the newest record, ``runs`` = how many there were."""
    if cells.empty:
        return cells.assign(runs=pd.Series(dtype=int))
    runs = cells.groupby(["gpu_model", "cell_id"])["cell_id"].transform("size")
    out = cells.assign(runs=runs, _ts=cells["timestamp"].astype(str))
    return out.sort_values(["_ts", "record_index"]).drop_duplicates(["gpu_model", "cell_id"], keep="last").drop(
        columns="_ts")


def _show(r: pd.Series | None, metric: str) -> str:
    if r is None:
        return "not run"
    st = str(r["status"])
    if st != "ok":
        return "OOM" if st == "oom" else st
    if metric == "tokens_per_s":
        v = r["tokens_per_s"]
        text = "-" if v != v or v is None else f"{v:,.0f}"
    else:
        text = fmt("peak_vram_bytes", r["memory_bytes"])
        if r.get("memory_kind") == "RSS" and text != "-":
            text += " RSS"
    return text + (f" ({int(r['runs'])} records)" if r.get("runs", 1) > 1 else "")


def side_by_side(cells: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Rows: cells; columns: tokens/s and peak memory per GPU model."""
    models = gpu_models(cells)
    latest = newest(cells)
    by = {(str(r["gpu_model"]), str(r["cell_id"])): r for _, r in latest.iterrows()}
    heads = ["cell"] + [f"{what} ({m})" for m in models for what in ("tokens/s", "peak memory")]
    rows = []
    for cid in _cell_order(cells):
        row = [cid]
        for m in models:
            r = by.get((m, cid))
            row += [_show(r, "tokens_per_s"), _show(r, "memory")]
        rows.append(row)
    return heads, rows


def comparison_charts(cells: pd.DataFrame) -> list[Chart]:
    """Per model preset and batch size with cells on two GPU models or more: tokens/s and
    peak memory of each cell, one bar per GPU model (ok cells only)."""
    if len(gpu_models(cells)) < 2:
        return []
    latest = newest(cells[cells["status"] == "ok"])
    out = []
    for (model, bs), g in latest.groupby(["model", latest["batch_size"].fillna(1)], sort=True):
        models = gpu_models(g)
        if len(models) < 2:
            continue
        chart = _chart(str(model), int(bs), g, models)
        if chart is not None:
            out.append(chart)
    return out


def _num(sub: pd.DataFrame, cell_id: str, col: str) -> float:
    """A cell's value (0: no bar) from one GPU model's rows indexed by cell id."""
    if cell_id not in sub.index:
        return 0.0
    v = sub.loc[cell_id, col]
    return float(v) if v == v and v is not None else 0.0


def _chart(model: str, bs: int, g: pd.DataFrame, models: list[str]) -> Chart | None:
    order = _cell_order(g)
    precs, modes = precision_order(g["precision"]), mode_order(g["grad_ckpt"])
    labels = [c.split("/", 1)[1] if "/" in c else c for c in order]
    group = Group(device="all GPU models", model=model, batch_size=bs, cells=g.reset_index(drop=True))
    height = 0.32 * len(order) * max(1, len(models)) / 2 + 1.8
    with matplotlib.rc_context(STYLE):
        fig = new_figure(11.0, max(3.0, height))
        ax_t, ax_m = fig.subplots(1, 2, sharey=True)
        width = 0.8 / len(models)
        for k, m in enumerate(models):
            sub = g[g["gpu_model"] == m].set_index("cell_id")
            ys = [i + (k - (len(models) - 1) / 2) * width for i in range(len(order))]
            tps = [_num(sub, c, "tokens_per_s") for c in order]
            mem = [_num(sub, c, "memory_bytes") / GIB for c in order]
            color = GPU_COLORS[k % len(GPU_COLORS)]
            slug = "".join(ch if ch.isalnum() else "-" for ch in m.lower())
            ax_t.barh(ys, tps, height=width, color=color, gid=f"series-tps-{slug}")
            ax_m.barh(ys, mem, height=width, color=color, gid=f"series-mem-{slug}")
        ax_t.set_yticks(range(len(order)))
        ax_t.set_yticklabels(labels)
        ax_t.invert_yaxis()
        ax_t.set_xlabel("tokens/s (higher is better)")
        ax_t.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        kinds = set(g["memory_kind"].dropna())
        ax_m.set_xlabel("peak memory, GiB (" + ("VRAM" if kinds == {"VRAM"} else "VRAM on GPUs, RSS on CPUs") + ")")
        fig.legend(handles=[Patch(color=GPU_COLORS[k % len(GPU_COLORS)], label=m) for k, m in enumerate(models)],
                   loc="outside lower center", ncol=min(4, len(models)), frameon=False)
        fig.suptitle(f"The same cells on {len(models)} GPU models\n{model}, batch {bs}", fontsize=12)
    caption = ("Newest ok record of each cell per GPU model; a missing bar is a cell that did not finish (or was not "
               f"run) on that model. Precisions: {', '.join(precs)}; checkpointing: {', '.join(modes)}.")
    return Chart("gpu-models", "the same cells on each GPU model", group, fig, series_labels(fig), caption)
