"""``lora-harness report``: run folders -> charts + report.md + report.html.

Assembles the page (harness.report.pages blocks) from the loaded runs, the charts
(harness.report.charts) and the tables (harness.report.tables), then writes the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.report import gpu_models as gpu_model_mod
from harness.report import pages, tables
from harness.report import stacks as stacks_mod
from harness.report.chart_set import all_charts
from harness.report.charts import Chart, groups, save
from harness.report.load import RunLoadError, RunSet, load_run_set
from harness.report.pages import Block, Bullets, Code, FigureBlock, Heading, Para


class ReportError(RunLoadError):
    """The report cannot be written (unwritable folder, no run)."""


@dataclass(frozen=True)
class ReportFiles:
    out_dir: Path
    markdown: Path
    html: Path
    charts: tuple[Path, ...]
    warnings: tuple[str, ...]


def _shown(path: str) -> str:
    """A path as people should read it: relative to the working folder when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def page_blocks(rs: RunSet, charts: Sequence[tuple[Chart, dict[str, Path]]], out_dir: Path) -> list[Block]:
    cells = rs.cells
    devices = ", ".join(dict.fromkeys(cells["device_label"].astype(str)))
    blocks: list[Block] = [
        Para(f"{len(cells)} cells from {len(rs.runs)} run folder(s) on {devices}: {tables.status_counts(cells)}."),
        Para("Settings: " + tables.settings_line(cells) + "."),
    ]
    blocks += [Para(w, "warning") for w in rs.warnings]
    blocks.append(Heading("Runs"))
    blocks.append(pages.table(["run", "folder", "device", "records", "cells"],
                              [[r.run_id, _shown(r.path), r.device_label, str(r.n_records),
                                str(int((cells["run_dir"] == r.path).sum()))] for r in rs.runs]))
    blocks.append(Para("Commands that produced them (from each run's run.json):"))
    blocks.append(Code("\n".join(f"# {r.run_id}\n" + ("\n".join(r.commands) or "(not recorded)") for r in rs.runs)))
    blocks += gpu_model_blocks(cells, charts, out_dir)  # runs from several GPU models

    for g in groups(cells):
        blocks.append(Heading(f"Charts: {g.subtitle}"))
        for chart, paths in charts:
            if chart.group.slug != g.slug or "png" not in paths or chart.kind == "stacks":
                continue
            rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731 - pages link relative to themselves
            blocks.append(Heading(chart.title[0].upper() + chart.title[1:], 3))
            blocks.append(FigureBlock(rel(paths["png"]), chart.title, chart.caption,
                                      rel(paths["svg"]) if "svg" in paths else None))

    blocks += stack_blocks(rs, charts, out_dir)
    blocks.append(Heading("Tables"))
    blocks.append(Para("Units converted for reading; results.jsonl holds bytes and seconds. "
                       "Peak memory figures are single measurements per cell; step times are the median of the "
                       "measured steps (warm-up excluded), spread = (max - min) / median over those steps."))
    for title, (heads, rows) in (("Speed", tables.speed_table(cells)), ("Memory", tables.memory_table(cells)),
                                 ("Training evidence", tables.training_table(cells))):
        blocks.append(Heading(title, 3))
        blocks.append(pages.table(heads, rows))
    heads, rows = tables.more_metrics_table(cells)
    if rows:
        blocks += [Heading("More metrics", 3), pages.table(heads, rows)]
    heads, rows = tables.problems_table(cells)
    blocks.append(Heading("Cells that did not finish", 3))
    blocks.append(pages.table(heads, rows, "" if rows else "Every cell finished."))

    blocks.append(Heading("Environment"))
    for r in rs.runs:
        heads, rows = tables.env_table(r.env)
        blocks.append(Heading(f"{r.run_id} ({r.device_label})", 3))
        blocks.append(pages.table(heads, rows) if rows else Para("env.json missing: fingerprint not recorded.", "warning"))
    blocks.append(Heading("Reading the numbers"))
    blocks.append(Bullets((
        "peak VRAM: NVML's device-wide 'used' peak over the whole cell, CUDA context and other processes included; "
        "torch peaks count only PyTorch's allocator.",
        "OOM cells are measurements: the memory shown is what the cell reached when it ran out.",
        "tokens/s = batch x sequence length / median step time; MFU uses the device's dense datasheet peak.",
        "Status classes: ok; OOM; unsupported (the host cannot run it); failed = error, crash or timeout.",
    )))
    return blocks


def fit_rows(rs: RunSet) -> list[dict]:
    """The fit search's rows (fit.json) of every run folder that has one."""
    import json

    rows: list[dict] = []
    for r in rs.runs:
        try:
            data = json.loads((Path(r.path) / "fit.json").read_text())
        except (OSError, ValueError):
            continue
        rows += [row for row in data.get("rows") or [] if isinstance(row, dict)]
    return rows


def stack_blocks(rs: RunSet, charts: Sequence[tuple[Chart, dict[str, Path]]], out_dir: Path) -> list[Block]:
    """The training stacks compared (only when the runs hold more than one stack)."""
    heads, rows = stacks_mod.table(rs.cells, fit_rows(rs))
    drawn = [(c, p) for c, p in charts if c.kind == "stacks" and "png" in p]
    if not rows and not drawn:
        return []
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
    blocks: list[Block] = [Heading("Training stacks compared"), Para(
        "Cells that differ only by their training stack, each against its hf cell (transformers + peft): tokens/s "
        "and NVML's peak, the longest context at 24 GiB where a fit search answered it, the loss against the hf bf16 "
        "cell of the same tokens and seed, and each vendor's claim with a verdict. Speed verdicts read the band "
        "between the slowest and fastest measured steps: a claim inside it cannot be told.")]
    if rows:
        blocks.append(pages.table(heads, rows))
        blocks.append(pages.table(*stacks_mod.claims_table(rs.cells)))
    for chart, paths in drawn:
        blocks.append(Heading(f"{chart.title[0].upper()}{chart.title[1:]}: {chart.group.subtitle}", 3))
        blocks.append(FigureBlock(rel(paths["png"]), chart.title, chart.caption,
                                  rel(paths["svg"]) if "svg" in paths else None))
    return blocks


def gpu_model_blocks(cells, charts: Sequence[tuple[Chart, dict[str, Path]]], out_dir: Path) -> list[Block]:
    """The same cells on each GPU model, side by side (only with two models or more)."""
    models = gpu_model_mod.gpu_models(cells)
    if len(models) < 2:
        return []
    heads, rows = gpu_model_mod.side_by_side(cells)
    blocks: list[Block] = [
        Heading("Across GPU models"),
        Para(f"{len(models)} GPU models: {', '.join(models)}. Each row is one cell, each GPU model a pair of "
             "columns; 'not run' means no run folder holds the cell on that model. Where a cell was measured "
             "more than once on one model, the newest record is shown (the count in brackets); compare pools "
             "them. Cells are never compared across GPU models by `lora-harness compare` unless asked "
             "(--across-gpus)."),
        pages.table(heads, rows),
    ]
    for chart, paths in charts:
        if chart.kind == "gpu-models" and "png" in paths:
            rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
            blocks.append(FigureBlock(rel(paths["png"]), chart.title, chart.caption,
                                      rel(paths["svg"]) if "svg" in paths else None))
    return blocks


def build_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
                 formats: tuple[str, ...] = ("png", "svg"), embed: bool = True) -> ReportFiles:
    """Load ``paths``, draw every chart into ``out/charts/`` and write report.md and
    report.html into ``out`` (default: the run folder, when there is one)."""
    rs = load_run_set(list(paths))
    if out is None:
        if len(paths) > 1 or len(rs.runs) > 1:
            raise ReportError("several run folders: say where the report goes with --out")
        given = Path(paths[0])
        out = given if given.is_dir() else given.parent
    out_dir = Path(out)
    chart_dir = out_dir / "charts"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        drawn = [(c, save(c, chart_dir, formats)) for c in all_charts(rs.cells)]
        drawn += [(c, save(c, chart_dir, formats)) for c in gpu_model_mod.comparison_charts(rs.cells)]
        blocks = page_blocks(rs, drawn, out_dir)
        title = "lora-harness report: " + ", ".join(r.run_id for r in rs.runs)
        md = out_dir / "report.md"
        md.write_text(pages.to_markdown(title, blocks))
        page = out_dir / "report.html"
        page.write_text(pages.to_html(title, blocks, out_dir, embed=embed))
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out_dir}: {exc.strerror or exc}") from None
    files = tuple(p for _, paths in drawn for p in paths.values())
    return ReportFiles(out_dir, md, page, files, rs.warnings)
