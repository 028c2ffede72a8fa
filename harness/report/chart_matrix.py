"""The matrix at a glance: which cells run on this host, and how their loss moved.

- ``status_grid``: rows are precision x checkpointing mode, columns sequence lengths; each
  cell coloured by its outcome (ok / OOM / unsupported / failed / not run);
- ``loss_curves``: one panel per precision, one line per length and mode, warm-up steps
  shaded.
"""

from __future__ import annotations

import math

import matplotlib
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from harness.report.charts import (MODE_LINES, STYLE, Chart, Group, mode_order, new_figure, precision_order, series_labels)

# Outcome classes of the grid; error, crash and timeout are all "failed" (a bug or a
# dead worker), unlike OOM (a measurement) and unsupported (the host can't).
STATUS_CLASSES: dict[str, tuple[str, str]] = {
    "ok": ("ok", "#4caf50"),
    "oom": ("OOM", "#ff9800"),
    "unsupported": ("unsupported", "#b0b0b0"),
    "failed": ("failed", "#e53935"),
    "not run": ("not run", "#ffffff"),
}


def status_class(status: str | None) -> str:
    if status in ("ok", "oom", "unsupported"):
        return status
    return "failed"


def grid_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Rows 'precision / gc-mode', columns sequence lengths, values the raw status. Pure."""
    precs = precision_order(cells["precision"])
    modes = mode_order(cells["grad_ckpt"])
    lengths = sorted(int(s) for s in cells["seq_len"].dropna().unique())
    index = [f"{p} / gc-{m}" for p in precs for m in modes]
    table = pd.DataFrame(None, index=index, columns=lengths, dtype=object)
    for _, r in cells.iterrows():
        table.loc[f"{r['precision']} / gc-{r['grad_ckpt']}", int(r["seq_len"])] = r["status"]
    return table


def status_grid(g: Group) -> Chart | None:
    table = grid_table(g.cells)
    if table.empty:
        return None
    nrows, ncols = table.shape
    # OOM cells recorded without running (a shorter cell of the row ran out): say so
    pruned = {(f"{r['precision']} / gc-{r['grad_ckpt']}", int(r["seq_len"])) for _, r in g.cells.iterrows()
              if r["status"] == "oom" and r.get("pruned") == True}  # noqa: E712
    with matplotlib.rc_context(STYLE):
        fig = new_figure(max(5.0, 1.25 * ncols + 2.8), 0.36 * nrows + 1.9)
        ax = fig.subplots()
        for i, row in enumerate(table.index):
            for j, col in enumerate(table.columns):
                st = table.loc[row, col]
                cls = "not run" if st is None or st != st else status_class(st)
                label, color = STATUS_CLASSES[cls]
                ax.add_patch(Rectangle((j, i), 1, 1, facecolor=color, edgecolor="white", linewidth=2,
                                       gid=f"series-cell-{cls.replace(' ', '-')}-{row}-{col}".replace(" / ", "-")))
                text = "" if cls == "not run" else (st if cls == "failed" else label)
                if (row, col) in pruned:
                    text = "OOM (pruned)"
                ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8.5,
                        color="black" if cls in ("unsupported", "oom", "not run") else "white", fontweight="bold")
        ax.set_xlim(0, ncols)
        ax.set_ylim(nrows, 0)
        ax.set_xticks([j + 0.5 for j in range(ncols)], [f"{c:,}" for c in table.columns])
        ax.set_yticks([i + 0.5 for i in range(nrows)], list(table.index))
        ax.set_xlabel("sequence length (tokens)")
        ax.tick_params(length=0)
        ax.grid(False)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        counts = g.cells["status"].map(status_class).value_counts()
        counts["not run"] = int(table.isna().sum().sum())
        handles = [Patch(facecolor=STATUS_CLASSES[c][1], edgecolor="#888888",
                         label=f"{STATUS_CLASSES[c][0]} ({counts.get(c, 0)})") for c in STATUS_CLASSES]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=8.5)
        fig.suptitle(f"What runs on this host: outcome of every cell\n{g.subtitle}", fontsize=12)
    return Chart("status", "status of every cell", g, fig, series_labels(fig),
                 "failed = error, crash or timeout (the cell's status is written in it); "
                 "not run = no record for that combination.")


def loss_curves(g: Group) -> Chart | None:
    d = g.cells[(g.cells["status"] == "ok") & g.cells["losses"].map(lambda v: isinstance(v, list) and len(v) > 1)]
    if d.empty:
        return None
    precs = precision_order(d["precision"])
    lengths = sorted(int(s) for s in d["seq_len"].unique())
    cmap = matplotlib.colormaps["viridis"]
    colors = {s: cmap(0.85 * i / max(1, len(lengths) - 1)) for i, s in enumerate(lengths)}
    styles = MODE_LINES
    cols = min(len(precs), 3)
    nrows = (len(precs) + cols - 1) // cols
    with matplotlib.rc_context(STYLE):
        fig = new_figure(4.6 * cols + 0.6, 3.6 * nrows + 1.2)
        axes = fig.subplots(nrows, cols, sharey=True, squeeze=False).ravel()
        for ax, p in zip(axes, precs):
            rows = d[d["precision"] == p].sort_values(["seq_len", "grad_ckpt"])
            warm = int(rows["spec"].map(lambda s: (s or {}).get("warmup_steps", 0) if isinstance(s, dict) else 0).max())
            if warm:
                ax.axvspan(0.5, warm + 0.5, color="#eeeeee", zorder=0)
                ax.text(0.6, 0.98, "warm-up", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#777")
            for _, r in rows.iterrows():
                ys = [math.nan if v is None else v for v in r["losses"]]  # non-finite: a gap
                ax.plot(range(1, len(ys) + 1), ys, color=colors[int(r["seq_len"])],
                        linestyle=styles.get(r["grad_ckpt"], "-."), linewidth=1.4,
                        gid=f"series-{p}-s{int(r['seq_len'])}-{r['grad_ckpt']}")
            ax.set_title(p, fontweight="bold")
            ax.set_xlabel("training step")
            ax.xaxis.get_major_locator().set_params(integer=True)
        for ax in axes[len(precs):]:
            ax.set_visible(False)
        for ax in axes[::cols]:
            ax.set_ylabel("loss (cross-entropy, nats)")
        handles = [Line2D([], [], color=colors[s], label=f"{s:,} tokens") for s in lengths]
        handles += [Line2D([], [], color="black", linestyle=styles[m], label=f"gc-{m}")
                    for m in mode_order(d["grad_ckpt"]) if m in styles]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), frameon=False)
        fig.suptitle(f"Loss per training step, by precision\n{g.subtitle}; colour = length, line style = checkpointing",
                     fontsize=12)
    return Chart("loss", "loss curves", g, fig, series_labels(fig),
                 "Synthetic learnable token stream; a falling loss shows the LoRA weights learn. Few steps: "
                 "curves show that training works, not convergence.")
