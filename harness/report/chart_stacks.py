"""The training stacks side by side: tokens/s and peak memory per stack at each length,
for cells that differ only by their stack (same model, precision, checkpointing mode,
batch size, compile and attention settings, device)."""

from __future__ import annotations

import matplotlib
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import StrMethodFormatter

from harness.core.axes import STACK_NAMES, STACKS, ordered
from harness.report.charts import (STYLE, Chart, Group, mode_order, new_figure, precision_order, seq_axis,
                                   series_labels, stack_of)
from harness.report.units import GIB

STACK_COLORS: dict[str, str] = {s.name: s.colour for s in STACKS}
MAX_ROWS = 6  # (precision, mode) pairs drawn; more make an unreadable figure


def _pairs(ok: pd.DataFrame) -> list[tuple[str, str]]:
    """(precision, mode) pairs measured on more than one stack, in the registries' order."""
    out = []
    for p in precision_order(ok["precision"]):
        for m in mode_order(ok.loc[ok["precision"] == p, "grad_ckpt"]):
            d = ok[(ok["precision"] == p) & (ok["grad_ckpt"] == m)]
            if d["_stack"].nunique() > 1:
                out.append((p, m))
    return out[:MAX_ROWS]


def stack_chart(g: Group) -> Chart | None:
    ok = g.cells[g.cells["status"] == "ok"].assign(_stack=lambda d: d["cell_id"].map(stack_of))
    pairs = _pairs(ok)
    if not pairs:
        return None
    stacks = ordered(ok["_stack"], STACK_NAMES)
    kind = "VRAM" if (ok["memory_kind"] == "VRAM").any() else "RSS"
    with matplotlib.rc_context(STYLE):
        fig = new_figure(10.0, 3.4 * len(pairs) + 1.0)
        axes = fig.subplots(len(pairs), 2, squeeze=False)
        for (p, m), (ax_tps, ax_mem) in zip(pairs, axes):
            d = ok[(ok["precision"] == p) & (ok["grad_ckpt"] == m)]
            for st in stacks:
                rows = d[d["_stack"] == st].sort_values("seq_len")
                if rows.empty:
                    continue
                colour = STACK_COLORS.get(st, "black")
                ax_tps.plot(rows["seq_len"], rows["tokens_per_s"], marker="o", color=colour,
                            gid=f"series-tps-{p}-{m}-{st}")
                ax_mem.plot(rows["seq_len"], rows["memory_bytes"] / GIB, marker="o", color=colour,
                            gid=f"series-mem-{p}-{m}-{st}")
            for ax, what in ((ax_tps, "tokens/s"), (ax_mem, f"peak {kind} (GiB)")):
                seq_axis(ax, d["seq_len"])
                ax.set_ylabel(what)
                ax.set_title(f"{p}, gc-{m}")
                ax.set_ylim(bottom=0)
            ax_tps.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        handles = [Line2D([], [], color=STACK_COLORS.get(s, "black"), marker="o", label=s) for s in stacks]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(f"Training stacks: throughput and peak {kind} vs sequence length\n{g.subtitle}", fontsize=12)
    return Chart("stacks", "training stacks compared", g, fig, series_labels(fig),
                 "Cells that differ only by their training stack, ok cells only: tokens/s at the median measured step "
                 f"(left) and the peak {kind} (right).")
