"""Charts: files are written, and each holds the series it should (counted in the SVG)."""

import re

import pytest

from harness.report.chart_set import all_charts
from harness.report.charts import groups, save
from harness.report.chart_scaling import tradeoff_points
from harness.report.load import load_run_set
from tests.report_helpers import FIXTURES, H200


def svg_ids(path, prefix):
    return re.findall(rf'id="({prefix}[^"]*)"', path.read_text())


@pytest.fixture(scope="module")
def cpu_charts(tmp_path_factory):
    out = tmp_path_factory.mktemp("charts")
    cells = load_run_set([FIXTURES / "cpu-mixed"]).cells
    return {c.kind: (c, save(c, out)) for c in all_charts(cells)}


def test_every_chart_is_written_as_png_and_svg(cpu_charts):
    assert set(cpu_charts) == {"status", "memory", "throughput", "checkpointing", "loss"}
    for chart, paths in cpu_charts.values():
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
        assert paths["svg"].read_text().lstrip().startswith("<?xml")


def test_memory_and_throughput_have_one_series_per_precision_and_mode(cpu_charts):
    for kind in ("memory", "throughput"):
        chart, paths = cpu_charts[kind]
        series = svg_ids(paths["svg"], "series-")
        # fp32, bf16, nf4 ran ok in each of off / on / offload; int8 and fp4 never did
        assert sorted(series) == sorted(f"series-{m}-{p}" for m in ("off", "on", "offload")
                                        for p in ("fp32", "bf16", "nf4")), kind
        assert sorted(series) == sorted(chart.series)
        # every OOM cell is marked: 10 of them (fp32/s4096/gc-off and every s16384 cell)
        assert len(svg_ids(paths["svg"], "oom-")) == 10
        assert "oom-off-fp32-s4096" in svg_ids(paths["svg"], "oom-")


def test_status_grid_shows_every_outcome(cpu_charts):
    _, paths = cpu_charts["status"]
    cells = svg_ids(paths["svg"], "series-cell-")
    kinds = {}
    for c in cells:
        k = c.split("-")[2]
        kinds[k] = kinds.get(k, 0) + 1
    # 5 precisions x 3 modes x 5 lengths drawn; 51 with a record, the rest 'not run'
    assert kinds == {"ok": 35, "oom": 10, "unsupported": 3, "failed": 3, "not": 75 - 51}


def test_checkpointing_tradeoff_and_loss_series(cpu_charts):
    chart, paths = cpu_charts["checkpointing"]
    assert sorted(svg_ids(paths["svg"], "series-")) == sorted(
        f"series-{p}-{m}" for p in ("fp32", "bf16", "nf4") for m in ("on", "offload"))
    assert "fits only with checkpointing" in paths["svg"].read_text()  # fp32 at 4096: gc-off ran out of memory
    chart, paths = cpu_charts["loss"]
    assert len(svg_ids(paths["svg"], "series-")) == 35  # every ok cell recorded its losses


def test_vram_chart_of_the_h200_run_has_card_lines_and_device_size(tmp_path):
    cells = load_run_set([H200]).cells
    (g,) = groups(cells)
    charts = {c.kind: c for c in all_charts(cells)}
    paths = save(charts["memory"], tmp_path)
    svg = paths["svg"].read_text()
    for label in ("16 GB", "24 GB", "40 GB", "48 GB", "80 GB", "140 GiB", "peak VRAM (GiB)"):
        assert label in svg, label
    assert len(charts["memory"].series) == 9 and g.subtitle == "llama-3.1-8b on NVIDIA H200, batch 1"


def test_tradeoff_points_against_gc_off():
    cells = load_run_set([H200]).cells
    pts = tradeoff_points(cells).set_index(["precision", "grad_ckpt", "seq_len"])
    p = pts.loc[("bf16", "on", 8192)]
    # bf16 s8192: 84.97 GiB without checkpointing, 34.49 GiB with; 10,006 -> 7,167 tokens/s
    assert p["memory_saved_bytes"] / 2 ** 30 == pytest.approx(84.97 - 34.49, abs=0.02)
    assert p["throughput_lost"] == pytest.approx(1 - 7167.3 / 10006.2, abs=1e-3)
    assert len(pts) == 3 * 2 * 3


def test_pruned_ooms_are_marked_as_not_run(tmp_path):
    """A pruned OOM (recorded without running: a shorter cell of its row ran out of
    memory) has no memory figure: it is drawn hollow, and the grid says it was pruned."""
    from tests.report_helpers import record, write_run

    recs = [record("m/bf16/s512/gc-off"), record("m/bf16/s1024/gc-off", "oom", vram_gib=70.0),
            record("m/bf16/s2048/gc-off", "oom", vram_gib=None, pruned=True, pruned_by="m/bf16/s1024/gc-off")]
    cells = load_run_set([write_run(tmp_path / "run", recs)]).cells
    charts = {c.kind: save(c, tmp_path / "charts") for c in all_charts(cells)}
    svg = charts["memory"]["svg"].read_text()
    assert sorted(svg_ids(charts["memory"]["svg"], "oom-")) == ["oom-off-bf16-s1024", "oom-off-bf16-s2048"]
    assert "OOM, not run (pruned: a shorter cell ran out)" in svg and "memory reached when it ran out" in svg
    assert "OOM (pruned)" in charts["status"]["svg"].read_text()


def test_torchrun_cells_are_charted_apart_from_one_gpu_cells():
    cells = load_run_set([H200]).cells
    ws2 = cells[cells["cell_id"].str.endswith("/s2048/gc-on")].copy()
    ws2["cell_id"] = ws2["cell_id"] + "/ws2-ddp"
    import pandas as pd

    gs = groups(pd.concat([cells, ws2], ignore_index=True))
    assert [g.layout for g in gs] == ["", "ws2-ddp"]
    assert len(gs[0].cells) == len(cells) and len(gs[1].cells) == len(ws2)
    assert gs[1].slug.endswith("-ws2-ddp") and "2 GPUs (DDP" in gs[1].subtitle
