"""Charts of a loaded run set: what is drawn, in which groups, and how files are written.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas: no pyplot, no
global figure registry, no interactive backend (reports are made on servers and in CI).
Each plotted series carries a ``gid`` (``series-...``), which the SVG output keeps as an
element id, so a test can count the series in the file itself.

One set of charts is drawn per group of cells that share a device, a model and a batch
size: lines of different devices or models on one axis would compare unlike things.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.core.axes import CHECKPOINTING_MODES, GRAD_CKPT_MODES, PRECISION_MODES, PRECISIONS, ordered

# Colours and titles come from the axis registry, so bf16 is the same colour in every
# chart of every report.
PRECISION_COLORS: dict[str, str] = {m.name: m.colour for m in PRECISION_MODES}
MODE_COLORS: dict[str, str] = {m.name: m.colour for m in CHECKPOINTING_MODES}
MODE_TITLES: dict[str, str] = {m.name: m.title for m in CHECKPOINTING_MODES}
MODE_LINES: dict[str, str] = {m.name: m.line_style for m in CHECKPOINTING_MODES}
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}


@dataclass(frozen=True)
class Group:
    """Cells drawn together: one device, one model, one batch size, one process layout
    (``layout`` is "" for one-GPU cells, else the id's ``ws<N>-<strategy>``: a torchrun
    cell's total tokens/s and per-rank peak are never drawn on a one-GPU cell's line)."""

    device: str
    model: str
    batch_size: int
    cells: pd.DataFrame
    layout: str = ""
    # the id's training-stack parts ("stack-liger/compile/attn-eager"; "" for plain hf):
    # lines of one precision never join cells of different stacks
    variant: str = ""

    @property
    def slug(self) -> str:
        return slugify(f"{self.model}-{self.device}" + (f"-b{self.batch_size}" if self.batch_size != 1 else "")
                       + (f"-{self.layout}" if self.layout else "") + (f"-{self.variant}" if self.variant else ""))

    @property
    def subtitle(self) -> str:
        b = f", batch {self.batch_size}" if self.batch_size != 1 else ", batch 1"
        lay = ""
        if self.layout:
            n, strategy = self.layout[2:].split("-", 1)
            lay = f", {n} GPUs ({strategy.upper()}; tokens/s in total, memory the largest rank's)"
        return f"{self.model} on {self.device}{b}{lay}{variant_text(self.variant)}"


VARIANT_PARTS = r"/(stack-[a-z0-9_]+|compile|attn-[a-z0-9_]+)(?=/|$)"


def variant_of(cell_id: str, *, with_stack: bool = True) -> str:
    """The training-stack parts of a cell id, in order ("stack-liger/compile")."""
    parts = re.findall(VARIANT_PARTS, str(cell_id))
    return "/".join(p for p in parts if with_stack or not p.startswith("stack-"))


def variant_text(variant: str) -> str:
    words = {"compile": "compiled"}
    return "".join(", " + (words.get(p) or p.replace("stack-", "stack ").replace("attn-", "attention "))
                   for p in variant.split("/") if p)


@dataclass(frozen=True, eq=False)
class Chart:
    """A drawn chart: ``kind`` (file stem), the figure and the labels of its series."""

    kind: str
    title: str
    group: Group
    figure: Figure
    series: tuple[str, ...]
    caption: str = ""

    @property
    def stem(self) -> str:
        return f"{self.kind}--{self.group.slug}"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def precision_order(values) -> list[str]:
    return ordered([v for v in values if isinstance(v, str)], PRECISIONS)


def mode_order(values) -> list[str]:
    return ordered([v for v in values if isinstance(v, str)], GRAD_CKPT_MODES)


def groups(cells: pd.DataFrame) -> list[Group]:
    """Cells split by device, model and batch size (rows without axes are left out).
    Several runs of one cell on one device: the latest record is drawn."""
    return _split(cells, with_stack=True)


def _split(cells: pd.DataFrame, *, with_stack: bool) -> list[Group]:
    d = cells.dropna(subset=["model", "precision", "seq_len", "grad_ckpt"])
    ids = d["cell_id"].astype(str)
    layout = ids.str.extract(r"/(ws\d+-[a-z0-9]+)(?:/|$)")[0].fillna("")
    variant = ids.map(lambda c: variant_of(c, with_stack=with_stack))
    out = []
    for (dev, model, bs, lay, var), g in d.groupby(["device_label", "model", d["batch_size"].fillna(1), layout,
                                                     variant], sort=True):
        g = g.sort_values("timestamp", na_position="first").drop_duplicates("cell_id", keep="last")
        out.append(Group(str(dev), str(model), int(bs), g.reset_index(drop=True), str(lay), str(var)))
    return out


def stack_groups(cells: pd.DataFrame) -> list[Group]:
    """Cells split as ``groups`` does but across stacks (for the stack comparison chart):
    only groups that hold more than one stack."""
    return [g for g in _split(cells, with_stack=False) if g.cells["cell_id"].map(stack_of).nunique() > 1]


def stack_of(cell_id: str) -> str:
    """The training stack a cell id names ("hf" when it names none)."""
    return (re.findall(r"/stack-([a-z0-9_]+)(?=/|$)", str(cell_id)) or ["hf"])[0]


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg renders it; nothing interactive is involved
    return fig


def seq_axis(ax, lengths) -> None:
    """Sequence length on a log2 axis with the measured lengths as ticks, in order."""
    ticks = sorted({int(x) for x in lengths if x == x})
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:,}" for t in ticks])
        ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.4)
    ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens, log scale)")


def series_labels(fig: Figure) -> tuple[str, ...]:
    """The gids of every series drawn on a figure (what the SVG will hold)."""
    out = []
    for ax in fig.axes:
        for artist in [*ax.lines, *ax.collections, *ax.patches, *ax.images]:
            gid = artist.get_gid()
            if gid and gid.startswith("series-"):
                out.append(gid)
    return tuple(out)


def save(chart: Chart, folder: Path, formats: tuple[str, ...] = ("png", "svg")) -> dict[str, Path]:
    """Write the chart as PNG and SVG; returns {format: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in formats:
        path = folder / f"{chart.stem}.{fmt}"
        # a fixed hash salt and no date keep the SVG identical from one run to the next
        meta = {"Date": None} if fmt == "svg" else {}
        with matplotlib.rc_context({"svg.hashsalt": "lora-harness"}):
            chart.figure.savefig(path, format=fmt, dpi=110 if fmt == "png" else None, metadata=meta)
        paths[fmt] = path
    return paths
