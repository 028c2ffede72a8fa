"""``lora-harness sweep-cost`` on the committed H200 reference run (records from before the
phase timers: fixed cost from wall time minus the timed steps, marked approximate), and
the repeatability / overhead tables' verdicts on made-up figures."""

import json

import pytest

from harness.cli import main
from harness.report.perf_tables import overhead_rows, repeatability, sweep_cost_of_run

REF = "reports/reference/h200-core-2026-11-29"


def test_sweep_cost_of_the_reference_run():
    cost = sweep_cost_of_run(REF)
    t = cost["totals"]
    assert t["cells"] == t["cells_run"] == 27 and t["fixed_cost_source"] == "approx"
    assert t["cells_wall_s"] == pytest.approx(446.5, abs=0.1)
    assert t["fixed_cost_s"] + t["warmup_s"] + t["measured_s"] == pytest.approx(t["cells_wall_s"])
    # 19:36:46 (server up) to the last record at 19:44:13; the server took 22.4 s (console.log)
    assert t["sweep_wall_s"] == 447 and t["worker_start_s"] == 22.4 and t["worker_preload_s"] == pytest.approx(15.76, abs=0.01)
    med = t["fixed_cost_median_by_precision"]
    assert med["bf16"] == pytest.approx(1.8, abs=0.1) and med["nf4"] == pytest.approx(4.5, abs=0.1)
    assert med["int8"] == pytest.approx(22.5, abs=0.2)  # LLM.int8 conversion at every load
    first_int8 = next(c for c in cost["cells"] if c["cell_id"] == "llama-3.1-8b/int8/s512/gc-off")
    assert first_int8["checkpoint_written"] and first_int8["fixed_within_target"] is None  # wrote the checkpoint
    assert sum(1 for c in cost["cells"] if c["fixed_within_target"] is False) == 8  # the other int8 cells


def test_sweep_cost_command(tmp_path, capsys):
    assert main(["sweep-cost", REF, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| llama-3.1-8b/int8/s2048/gc-off | ok | 26.8 | 22.8 ~ |" in out and "bf16 1.8 s, int8 22.5 s, nf4 4.5 s" in out
    assert json.loads((tmp_path / "sweep-cost.json").read_text())["totals"]["cells"] == 27
    assert main(["sweep-cost", str(tmp_path)]) == 2  # not a run folder: a usage error


def _rec(cell, tag, tps, peak, status="ok"):
    return {"cell_id": f"{cell}/{tag}", "spec": {"tag": tag}, "status": status, "tokens_per_s": tps,
            "peak_vram_bytes": peak, "torch_peak_allocated_bytes": peak - 10, "torch_peak_reserved_bytes": peak,
            "peak_rss_bytes": 5, "step_time_spread": 0.1}


def test_repeatability_verdicts():
    recs = [_rec("m/bf16/s2048/gc-on", "r0", 1000, 10_000), _rec("m/bf16/s2048/gc-on", "r1", 1020, 10_050),
            _rec("m/bf16/s2048/gc-on", "r2", 1010, 10_020), _rec("m/nf4/s2048/gc-on", "r0", 900, 5_000),
            _rec("m/nf4/s2048/gc-on", "r1", 990, 5_200), _rec("m/nf4/s2048/gc-on", "r0-nvml-off", 1, 1)]
    rows = {r["cell"]: r for r in repeatability(recs)}
    bf16, nf4 = rows["m/bf16/s2048/gc-on"], rows["m/nf4/s2048/gc-on"]
    assert bf16["repeats"] == 3 and bf16["tokens_per_s_spread"] == pytest.approx(20 / 1010)
    assert bf16["memory_pass"] and bf16["speed_pass"] and bf16["memory_judged_on"] == "peak_vram_bytes"
    assert nf4["memory_pass"] is False and nf4["speed_pass"] is False
    assert rows["m/nf4/s2048/gc-on/nvml-off"]["repeats"] == 1


def test_overhead_verdicts():
    runs = [{"cell": "c", "kind": "bare", "tokens_per_s": 1000.0, "torch_peak_allocated_bytes": 1000, "losses": [2.0]},
            {"cell": "c", "kind": "harness", "tokens_per_s": 975.0, "torch_peak_allocated_bytes": 1005, "losses": [2.0]},
            {"cell": "c", "kind": "harness-nvml-off", "tokens_per_s": 990.0, "torch_peak_allocated_bytes": 1005}]
    r = overhead_rows(runs)[0]
    assert r["speed_ratio"] == 0.975 and r["speed_pass"] and r["memory_pass"]
    assert r["sampler_ratio"] == pytest.approx(975 / 990) and r["sampler_pass"] is False  # 1.5% > 1%
    runs[1] = dict(runs[1], tokens_per_s=960.0, torch_peak_allocated_bytes=1020)
    r = overhead_rows(runs)[0]
    assert r["speed_pass"] is False and r["memory_pass"] is False


def test_a_run_with_repeated_cells_can_be_reported(tmp_path):
    """benchmarks/ write run folders holding each cell several times under tags: the
    checkpointing trade-off compares against the median of the repeated gc-off cells."""
    import pandas as pd

    from harness.report.chart_scaling import tradeoff_points

    rows = [{"status": "ok", "precision": "bf16", "seq_len": 2048, "grad_ckpt": g, "memory_bytes": m,
             "tokens_per_s": t} for g, m, t in (("off", 30.0, 1000.0), ("off", 32.0, 1100.0), ("off", 31.0, 900.0),
                                                 ("on", 20.0, 500.0))]
    pts = tradeoff_points(pd.DataFrame(rows))
    assert len(pts) == 1 and pts["memory_saved_bytes"].iloc[0] == 11.0 and pts["throughput_lost"].iloc[0] == 0.5
