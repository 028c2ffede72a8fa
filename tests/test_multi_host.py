"""Issue 8, many hosts: runs made on different GPU models merge into one report with the
GPU model as a dimension; compare never matches a cell across GPU models unless asked;
folders and globs of runs; a run copied twice is read once; serial vs parallel agreement."""

import json
import re

import pytest

from harness.report.agree import AgreeError, agreement, parse_tolerances
from harness.report.compare import CompareError, compare, parse_thresholds
from harness.report.build import build_report
from harness.report.load import load_run_set
from tests.report_helpers import H200, one_line_error, record, run, write_run

A100 = "NVIDIA A100-SXM4-80GB"
CELLS = ["llama-3.1-8b/bf16/s2048/gc-off", "llama-3.1-8b/nf4/s2048/gc-on", "llama-3.1-8b/bf16/s8192/gc-off"]
T = parse_thresholds(["tokens_per_s:-5%", "peak_vram_bytes:+3%"])


@pytest.fixture()
def shared(tmp_path):
    """A shared folder as a team fills it: one run folder per host and date, two GPU
    models, a consumer card's OOM, a README and a half-synced folder beside them."""
    root = tmp_path / "lora-runs"
    write_run(root / "h200-box-2026-12-01", [record(c, vram_gib=30.0) for c in CELLS],
              env={"hostname": "h200-box", "device": "cuda", "gpu_name": "NVIDIA H200"})
    write_run(root / "a100-box-2026-12-01",
              [record(CELLS[0], vram_gib=31.0, device_name=A100, steps=(0.2,) * 5),
               record(CELLS[1], vram_gib=12.0, device_name=A100, steps=(0.3,) * 5),
               record(CELLS[2], "oom", device_name=A100, vram_gib=79.5)],
              env={"hostname": "a100-box", "device": "cuda", "gpu_name": A100})
    (root / "README.md").write_text("runs of the team")
    (root / "rtx-box-2026-12-02").mkdir()  # still syncing: no results.jsonl yet
    return root


def test_runs_from_two_gpu_models_merge_with_the_model_as_a_column(shared):
    rs = load_run_set([shared])
    assert len(rs.runs) == 2 and any("a folder of 2 run folder(s)" in w for w in rs.warnings)
    by = rs.cells.groupby("gpu_model")["cell_id"].apply(sorted).to_dict()
    assert by == {A100: sorted(CELLS), "NVIDIA H200": sorted(CELLS)}
    # CPU cells are "cpu", and a pruned record (no device of its own) takes the run's model
    cpu = write_run(shared.parent / "cpu", [record("tiny-llama/bf16/s64/gc-off", device="cpu"),
                                           {**record("tiny-llama/bf16/s128/gc-off", "oom", device="cpu"),
                                            "device": None, "pruned": True}],
                    env={"hostname": "vm", "device": "cpu"})
    assert set(load_run_set([cpu]).cells["gpu_model"]) == {"cpu"}


def test_globs_and_collections_of_runs_skip_what_is_not_a_run(shared):
    rs = load_run_set([str(shared / "*")])  # a quoted glob, as a shell would pass it
    assert len(rs.runs) == 2 and any("2 match(es) without results.jsonl skipped" in w for w in rs.warnings)
    with pytest.raises(Exception, match="not a run folder"):  # named explicitly: still an error
        load_run_set([shared / "rtx-box-2026-12-02"])


def test_a_run_synced_to_two_places_is_read_once(shared, tmp_path):
    import shutil

    copy = tmp_path / "bucket-mirror" / "h200-box-2026-12-01"
    shutil.copytree(shared / "h200-box-2026-12-01", copy)
    rs = load_run_set([shared, copy])
    assert len(rs.runs) == 2 and any("(a copy); read once" in w for w in rs.warnings)


def test_report_puts_the_same_cell_on_each_gpu_model_side_by_side(shared, tmp_path):
    files = build_report([shared], tmp_path / "rep")
    md = files.markdown.read_text()
    assert "## Across GPU models" in md
    section = md[md.index("## Across GPU models"):md.index("## Charts")]
    assert f"| cell | tokens/s ({A100}) | peak memory ({A100}) | tokens/s (NVIDIA H200) | peak memory (NVIDIA H200) |" in section
    row = next(line for line in section.splitlines() if line.startswith("| llama-3.1-8b/bf16/s2048/gc-off |"))
    assert row == "| llama-3.1-8b/bf16/s2048/gc-off | 10,240 | 31.00 GiB | 20,480 | 30.00 GiB |"
    assert re.search(r"\| llama-3.1-8b/bf16/s8192/gc-off \| OOM \| OOM \| 81,920 \|", section)
    charts = [p.name for p in files.charts]
    assert "gpu-models--llama-3.1-8b-all-gpu-models.svg" in charts
    svg = (tmp_path / "rep" / "charts" / "gpu-models--llama-3.1-8b-all-gpu-models.svg").read_text()
    assert 'id="series-tps-nvidia-h200"' in svg and 'id="series-mem-nvidia-a100-sxm4-80gb"' in svg
    # per-device charts stay apart: one set per GPU model
    assert "memory--llama-3.1-8b-nvidia-h200.png" in charts and "memory--llama-3.1-8b-nvidia-a100-sxm4-80gb.png" in charts
    # one GPU model: no such section
    single = build_report([shared / "h200-box-2026-12-01"], tmp_path / "one")
    assert "Across GPU models" not in single.markdown.read_text()


def test_report_cli_reads_a_folder_of_runs_and_needs_out(shared, tmp_path):
    p = run("harness", "report", str(shared), "--out", str(tmp_path / "team"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "team" / "report.html").is_file()
    one_line_error(run("harness", "report", str(shared)), 2, "say where the report goes with --out")


def test_compare_never_matches_a_cell_across_gpu_models_unless_asked(shared):
    h200 = load_run_set([shared / "h200-box-2026-12-01"]).records
    a100 = load_run_set([shared / "a100-box-2026-12-01"]).records
    with pytest.raises(CompareError, match="compared on the same GPU model only .--across-gpus"):
        compare(h200, a100, T)
    across = compare(h200, a100, T, across_gpus=True)
    assert across.regressed and any("differences include the hardware" in w for w in across.warnings)
    # a merged current run: only the H200 cells are judged against an H200 baseline
    merged = load_run_set([shared]).records
    cmp = compare(h200, merged, T)
    assert cmp.compared == 3 and not cmp.regressed
    listed = {v.cell_id for v in cmp.cells if v.kind == "added"}
    assert listed == {f"{c} @ {A100}" for c in CELLS}


def test_compare_cli_across_gpus_flag(shared):
    base, cur = shared / "h200-box-2026-12-01", shared / "a100-box-2026-12-01"
    one_line_error(run("harness", "compare", str(base), str(cur)), 2, "same GPU model only")
    p = run("harness", "compare", str(base), str(cur), "--across-gpus", "--out", str(shared.parent / "c.md"))
    assert p.returncode == 1 and "REGRESSION" in p.stdout, p.stdout + p.stderr


def _pair(tmp_path, b_steps, b_vram, throughput_b=None):
    a = write_run(tmp_path / "serial", [record(c, vram_gib=20.0) for c in CELLS[:2]])
    b = write_run(tmp_path / "parallel", [record(CELLS[0], vram_gib=20.1),
                                          record(CELLS[1], vram_gib=b_vram, steps=b_steps)])
    for folder, t in ((a, {"gpus": [0], "cells": 2, "cells_run": 2, "cells_wall_s": 60.0, "cells_per_hour": 120.0}),
                      (b, throughput_b)):
        if t:
            meta = json.loads((folder / "run.json").read_text())
            meta["invocations"][0]["throughput"] = t
            (folder / "run.json").write_text(json.dumps(meta))
    return a, b


def test_agreement_within_tolerance_or_spread(tmp_path):
    noisy = (0.09, 0.13, 0.1, 0.1, 0.1)  # median 0.1 as A's, per-step spread 40%
    a, b = _pair(tmp_path, noisy, 20.2)
    res = agreement(load_run_set([a]).records, load_run_set([b]).records, parse_tolerances(None))
    verdicts = {(r.cell_id, r.metric): r.verdict for r in res}
    assert set(verdicts.values()) == {"agree"}
    a2, b2 = _pair(tmp_path / "x", tuple(t * 1.5 for t in (0.1,) * 5), 23.0)  # 33% slower, +15% memory
    res = agreement(load_run_set([a2]).records, load_run_set([b2]).records)
    bad = {r.metric for r in res if r.verdict == "differ"}
    assert bad == {"tokens_per_s", "memory_bytes"}
    assert parse_tolerances(["tokens_per_s:10%"])["tokens_per_s"] == pytest.approx(0.1)
    with pytest.raises(AgreeError, match="METRIC:N%"):
        parse_tolerances(["tokens_per_s"])
    other = write_run(tmp_path / "a100", [record(CELLS[0], device_name=A100)])
    with pytest.raises(AgreeError, match="same GPU model"):  # never across models
        agreement(load_run_set([a]).records, load_run_set([other]).records)


def test_agree_cli_prints_cells_per_hour_and_the_table(tmp_path):
    a, b = _pair(tmp_path, (0.1,) * 5, 20.2, {"gpus": [0, 1], "cells": 2, "cells_run": 2, "cells_wall_s": 31.0,
                                               "cells_per_hour": 232.26, "worker_start_s": 14.0})
    out = tmp_path / "agree.md"
    p = run("harness", "agree", str(a), str(b), "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "throughput: 2 cells in 60 s on 1 GPU(s) (0): 120 cells/hour" in p.stdout
    assert "2 cells in 31 s on 2 GPU(s) (0,1): 232 cells/hour; worker servers started in 14 s" in p.stdout
    assert "B runs 1.94x the cells per hour of A" in p.stdout
    assert "tokens/s: 2/2 cells agree" in p.stdout and "| llama-3.1-8b/nf4/s2048/gc-on | NVIDIA H200 |" in p.stdout
    assert out.read_text().startswith("# Do the runs agree?")
    a2, b2 = _pair(tmp_path / "x", (0.2,) * 5, 20.0)
    assert run("harness", "agree", str(a2), str(b2)).returncode == 1
    one_line_error(run("harness", "agree", str(a2), str(tmp_path / "nope")), 2, "no such run folder")


def test_throughput_is_estimated_for_runs_without_a_measurement():
    from harness.report import cell_rate as throughput

    t = throughput.of_run(H200)  # the serial reference run: no throughput in its run.json
    assert t["estimated"] and t["cells_run"] == 27 and 100 < t["cells_per_hour"] < 400
    assert "estimated from record timestamps" in throughput.line(t)
