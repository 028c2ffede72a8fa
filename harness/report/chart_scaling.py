"""How memory and speed scale with sequence length, and what checkpointing trades.

- ``memory_chart``: peak VRAM (or RSS on a CPU host) vs sequence length, one line per
  precision, one panel per checkpointing mode, card sizes as reference lines, OOM cells
  marked at the memory they reached;
- ``throughput_chart``: tokens/s vs sequence length, same layout, OOM cells marked;
- ``checkpointing_tradeoff``: per precision, memory saved vs throughput lost by each
  checkpointing mode against no checkpointing, at each length.
"""

from __future__ import annotations

import matplotlib
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import StrMethodFormatter

from harness.report.charts import (MODE_COLORS, MODE_TITLES, PRECISION_COLORS, STYLE, Chart, Group, mode_order,
                                   new_figure, precision_order, seq_axis, series_labels)
from harness.report.units import CARD_SIZES_GB, GIB


def _panels(g: Group, value_label: str, title: str, plot_panel, *, extra_handles=()) -> tuple:
    modes = mode_order(g.cells["grad_ckpt"])
    fig = new_figure(4.4 * len(modes) + 0.6, 4.8)
    axes = fig.subplots(1, len(modes), sharey=True, squeeze=False)[0]
    # only precisions with something to draw get a legend entry
    precs = precision_order(g.cells.loc[g.cells["status"].isin(["ok", "oom"]), "precision"])
    for ax, mode in zip(axes, modes):
        plot_panel(ax, g.cells[g.cells["grad_ckpt"] == mode], precs, mode)
        ax.set_title(MODE_TITLES.get(mode, f"gc-{mode}"))
        seq_axis(ax, g.cells["seq_len"])
    axes[0].set_ylabel(value_label)
    handles = [Line2D([], [], color=PRECISION_COLORS.get(p, "black"), marker="o", label=p) for p in precs]
    fig.legend(handles=[*handles, *extra_handles], loc="outside lower center", ncol=len(handles) + len(extra_handles),
               frameon=False)
    fig.suptitle(f"{title}\n{g.subtitle}", fontsize=12)
    return fig, axes


def _dodge(x: float, precision: str, precs: list[str], step: float = 0.12) -> float:
    """Spread markers of different precisions at one length so none hides another."""
    k = precs.index(precision) - (len(precs) - 1) / 2
    return float(x) * 2 ** (step * k)


def _oom_handle(text: str, *, hollow: bool = False) -> Line2D:
    return Line2D([], [], color="black", marker="X", linestyle="none", markersize=9, label=text,
                  markerfacecolor="none" if hollow else "black")


def is_pruned(row: pd.Series) -> bool:
    """An OOM recorded without running (a shorter cell of its row ran out of memory)."""
    return bool(row.get("pruned") == True)  # noqa: E712 - NaN / None / numpy bools all compare


def _oom_marker(ax, row: pd.Series, p: str, precs: list[str], mode: str, y: float | None, *,
                y_axes: float = 0.95) -> None:
    """An X at the cell's length: filled at ``y`` (data units) for a measured OOM; hollow
    at ``y_axes`` (a fraction of the panel's height) where nothing was measured (pruned)."""
    x = _dodge(row["seq_len"], p, precs)
    color = PRECISION_COLORS.get(p, "k")
    gid = f"oom-{mode}-{p}-s{int(row['seq_len'])}"
    if y is not None and not is_pruned(row):
        ax.plot([x], [y], marker="X", markersize=11, linestyle="none", markeredgecolor="black", color=color, gid=gid)
    else:
        ax.plot([x], [y_axes], marker="X", markersize=11, linestyle="none", markeredgecolor=color,
                markerfacecolor="none", markeredgewidth=1.5, transform=ax.get_xaxis_transform(), gid=gid)


def memory_chart(g: Group) -> Chart | None:
    ok = g.cells[g.cells["status"].isin(["ok", "oom"]) & g.cells["memory_bytes"].notna()]
    if ok.empty:
        return None
    vram = (g.cells["memory_kind"] == "VRAM").any()
    what = "peak VRAM" if vram else "peak resident memory (RSS)"
    device_total = g.cells["device_total_bytes"].dropna()
    device_gib = float(device_total.iloc[0]) / GIB if vram and not device_total.empty else None
    top = float(ok["memory_bytes"].max()) / GIB

    def panel(ax, d, precs, mode):
        for p in precs:
            rows = d[(d["precision"] == p) & (d["status"] == "ok")].sort_values("seq_len")
            if not rows.empty:
                ax.plot(rows["seq_len"], rows["memory_bytes"] / GIB, marker="o", color=PRECISION_COLORS.get(p, "k"),
                        label=p, gid=f"series-{mode}-{p}")
            for _, r in d[(d["precision"] == p) & (d["status"] == "oom")].iterrows():
                measured = r["memory_bytes"] == r["memory_bytes"]
                _oom_marker(ax, r, p, precs, mode, r["memory_bytes"] / GIB if measured else None)
        ceiling = max(top, device_gib or 0) * 1.08
        if vram:
            _card_lines(ax, device_gib, label=(mode == mode_order(g.cells["grad_ckpt"])[-1]), ceiling=ceiling)
        ax.set_ylim(0, ceiling)

    handles = _oom_handles(g.cells, "OOM (memory reached when it ran out)")
    if vram:
        handles.append(Line2D([], [], color="#999999", linestyle="--", label="card sizes (GB)"))
        if device_gib:
            handles.append(Line2D([], [], color="#8c564b", linestyle="-", label=f"this device ({device_gib:.0f} GiB)"))
    with matplotlib.rc_context(STYLE):
        fig, _ = _panels(g, f"{what} (GiB)", f"{what[0].upper()}{what[1:]} vs sequence length", panel,
                         extra_handles=handles)
    caption = ("NVML's device-wide peak over the whole cell (CUDA context included)." if vram else
               "CPU host: the worker's peak resident memory stands in for VRAM; no card-size lines.")
    return Chart("memory", f"{what} vs sequence length", g, fig, series_labels(fig), caption)


def _oom_handles(cells: pd.DataFrame, measured_label: str) -> list[Line2D]:
    oom = cells[cells["status"] == "oom"]
    pruned = oom.apply(is_pruned, axis=1) if not oom.empty else pd.Series(dtype=bool)
    out = []
    if (~pruned).any():
        out.append(_oom_handle(measured_label))
    if pruned.any():
        out.append(_oom_handle("OOM, not run (pruned: a shorter cell ran out)", hollow=True))
    return out


def _card_lines(ax, device_gib: float | None, *, label: bool, ceiling: float | None = None) -> None:
    """Dashed lines at common card sizes, a solid one at this device's own memory; none
    above the panel's top (labels far outside it collapse the figure's layout)."""
    for gb in CARD_SIZES_GB:
        if ceiling is not None and gb > ceiling:
            continue
        ax.axhline(gb, color="#999999", linestyle="--", linewidth=0.8, zorder=0)
        if label:
            ax.annotate(f"{gb} GB", xy=(1.0, gb), xycoords=("axes fraction", "data"), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8, color="#666666", annotation_clip=False)
    if device_gib:
        ax.axhline(device_gib, color="#8c564b", linewidth=1.2, zorder=0)
        if label:
            ax.annotate(f"{device_gib:.0f} GiB", xy=(1.0, device_gib), xycoords=("axes fraction", "data"),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=8, color="#8c564b",
                        annotation_clip=False)


def throughput_chart(g: Group) -> Chart | None:
    ok = g.cells[(g.cells["status"] == "ok") & g.cells["tokens_per_s"].notna()]
    if ok.empty:
        return None
    ranges = ok.apply(step_range, axis=1, result_type="expand")
    top = float(max(ok["tokens_per_s"].max(), ranges[1].max() if not ranges.empty else 0))

    def panel(ax, d, precs, mode):
        for p in precs:
            rows = d[(d["precision"] == p) & (d["status"] == "ok")].sort_values("seq_len")
            if not rows.empty:
                color = PRECISION_COLORS.get(p, "k")
                ax.plot(rows["seq_len"], rows["tokens_per_s"], marker="o", color=color, label=p,
                        gid=f"series-{mode}-{p}")
                # the fastest and slowest measured step: how far one number can be trusted
                lo_hi = rows.apply(step_range, axis=1, result_type="expand")
                xs = [_dodge(x, p, precs, 0.04) for x in rows["seq_len"]]
                ax.errorbar(xs, rows["tokens_per_s"], yerr=[(rows["tokens_per_s"] - lo_hi[0]).clip(lower=0),
                                                            (lo_hi[1] - rows["tokens_per_s"]).clip(lower=0)],
                            fmt="none", ecolor=color, elinewidth=1, capsize=3, alpha=0.7)
            for _, r in d[(d["precision"] == p) & (d["status"] == "oom")].iterrows():
                # no throughput for a cell that ran out of memory: mark it on the floor
                _oom_marker(ax, r, p, precs, mode, top * 0.03, y_axes=0.03)
        ax.set_ylim(0, top * 1.1)
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))

    with matplotlib.rc_context(STYLE):
        bars = Line2D([], [], color="#555555", marker="|", markersize=12, linestyle="none",
                      label="bar: slowest to fastest measured step")
        oom = _oom_handles(g.cells, "OOM (no throughput)")
        fig, _ = _panels(g, "throughput (tokens/s)", "Training throughput vs sequence length", panel,
                         extra_handles=[bars, *oom])
    return Chart("throughput", "tokens/s vs sequence length", g, fig, series_labels(fig),
                 "Tokens per second at the median measured step (warm-up excluded); the bars span the "
                 "slowest to the fastest measured step.")


def step_range(row: pd.Series) -> tuple[float, float]:
    """(slowest, fastest) tokens/s over a cell's measured steps; the median where not stored."""
    steps = [t for t in (row.get("step_times_s") or []) if t and t > 0]
    tokens = row.get("tokens_per_step")
    if not steps or not tokens or tokens != tokens:
        return float(row["tokens_per_s"]), float(row["tokens_per_s"])
    return float(tokens) / max(steps), float(tokens) / min(steps)


def tradeoff_points(cells: pd.DataFrame) -> pd.DataFrame:
    """Per precision, mode and length: memory saved (bytes) and throughput lost (fraction)
    against gc-off at the same length; both cells must be ok. Pure."""
    ok = cells[cells["status"] == "ok"]
    # a cell recorded several times (repeats under tags, the overhead benchmarks'): its median
    base = ok[ok["grad_ckpt"] == "off"].groupby(["precision", "seq_len"])[["memory_bytes", "tokens_per_s"]].median()
    rows = []
    for _, r in ok[ok["grad_ckpt"] != "off"].iterrows():
        key = (r["precision"], r["seq_len"])
        if key not in base.index:
            continue
        b = base.loc[key]
        rows.append({"precision": r["precision"], "grad_ckpt": r["grad_ckpt"], "seq_len": int(r["seq_len"]),
                     "memory_saved_bytes": b["memory_bytes"] - r["memory_bytes"],
                     "throughput_lost": 1.0 - r["tokens_per_s"] / b["tokens_per_s"]})
    return pd.DataFrame(rows, columns=["precision", "grad_ckpt", "seq_len", "memory_saved_bytes", "throughput_lost"])


def _fits_only_with(cells: pd.DataFrame, precision: str) -> list[str]:
    """Lengths where gc-off ran out of memory but a checkpointing mode ran."""
    d = cells[cells["precision"] == precision]
    out = []
    for s in sorted(d.loc[(d["grad_ckpt"] == "off") & (d["status"] == "oom"), "seq_len"].unique()):
        modes = d.loc[(d["seq_len"] == s) & (d["status"] == "ok") & (d["grad_ckpt"] != "off"), "grad_ckpt"]
        if len(modes):
            out.append(f"{int(s):,} ({', '.join('gc-' + m for m in mode_order(modes))})")
    return out


def checkpointing_tradeoff(g: Group) -> Chart | None:
    pts = tradeoff_points(g.cells)
    if pts.empty:
        return None
    precs = precision_order(pts["precision"])
    cols = min(len(precs), 4)
    nrows = (len(precs) + cols - 1) // cols
    kind = "VRAM" if (g.cells["memory_kind"] == "VRAM").any() else "RSS"
    with matplotlib.rc_context(STYLE):
        fig = new_figure(4.0 * cols + 0.6, 4.0 * nrows + 0.9)
        axes = fig.subplots(nrows, cols, sharey=True, squeeze=False).ravel()
        for ax, p in zip(axes, precs):
            d = pts[pts["precision"] == p]
            for mode in mode_order(d["grad_ckpt"]):
                m = d[d["grad_ckpt"] == mode].sort_values("seq_len")
                ax.plot(m["throughput_lost"] * 100, m["memory_saved_bytes"] / GIB, marker="o",
                        color=MODE_COLORS.get(mode, "k"), label=f"gc-{mode}", gid=f"series-{p}-{mode}")
                # labels of the two modes on opposite sides, so coincident points stay legible
                offset, align = ((5, 3), "left") if mode == "on" else ((-5, 3), "right")
                for _, r in m.iterrows():
                    ax.annotate(f"{r['seq_len']:,}", (r["throughput_lost"] * 100, r["memory_saved_bytes"] / GIB),
                                xytext=offset, textcoords="offset points", fontsize=8, ha=align,
                                color=MODE_COLORS.get(mode, "k"))
            ax.axhline(0, color="black", linewidth=0.8)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_title(p, color=PRECISION_COLORS.get(p, "black"), fontweight="bold")
            fits = _fits_only_with(g.cells, p)
            if fits:
                ax.text(0.02, 0.02, "fits only with checkpointing:\n" + "; ".join(fits), transform=ax.transAxes,
                        fontsize=8, va="bottom", color="#444444")
        for ax in axes[len(precs):]:
            ax.set_visible(False)
        for ax in axes[::cols]:
            ax.set_ylabel(f"peak {kind} saved (GiB)")
        for ax in axes[:len(precs)]:  # each panel keeps its own x range: label every one
            ax.set_xlabel("throughput lost (% of tokens/s)")
        handles = [Line2D([], [], color=MODE_COLORS.get(m, "k"), marker="o", label=MODE_TITLES.get(m, f"gc-{m}"))
                   for m in mode_order(pts["grad_ckpt"])]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle("Checkpointing: memory saved vs throughput lost, against no checkpointing\n"
                     f"{g.subtitle}; points labelled with the sequence length", fontsize=12)
    return Chart("checkpointing", "checkpointing cost and benefit", g, fig, series_labels(fig),
                 "Each point compares a checkpointing mode with gc-off at the same length and precision: "
                 "up is memory saved, right is throughput given up.")
