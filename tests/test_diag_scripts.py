"""The GPU diagnostics rehearsed on the CPU (tiny-llama): benchmarks/offload_memory.py
(one real harness cell per checkpointing variant; the variants compute the same thing)
and benchmarks/int8_memory.py (what a CPU can record: the saved-tensor accounting; the
allocator snapshot is said to be unavailable). Plus their --time-limit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import diagcommon  # noqa: E402


def _run(script, out, *args):
    cmd = [sys.executable, f"benchmarks/{script}", "--model", "tiny-llama", "--seq-len", "64", "--device", "cpu",
           "--cache-dir", str(out.parent / "cache"), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_offload_variants_run_as_harness_cells_and_agree(tmp_path):
    out = tmp_path / "offload"
    _run("offload_memory.py", out, "--precisions", "bf16,nf4")
    rows = json.loads((out / "offload_memory.json").read_text())["rows"]
    variants = ["on", "offload", "offload-current-stream", "offload-hold", "on-es", "offload-es"]
    assert [(r["precision"], r["variant"]) for r in rows] == [(p, v) for p in ("bf16", "nf4") for v in variants]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["allocator"] == {"reason": "no CUDA device: the caching allocator has no statistics"}
        assert r["torch_peak_allocated_bytes"] is None and r["reserved_over_allocated"] is None  # CPU: never made up
        mode = "on" if r["variant"].startswith("on") else "offload"
        assert (r["offloaded_bytes"] > 0) == (mode == "offload")
        assert r["offload_variant"] == {"offload": "record-stream", "offload-es": "record-stream", "on": None,
                                        "on-es": None}.get(r["variant"], r["variant"].removeprefix("offload-"))
        assert (r["alloc_conf"] == "expandable_segments:True") == r["variant"].endswith("-es")
        if mode == "offload":  # on the CPU every variant makes the same copy: identical losses
            assert r["loss_max_rel_diff_vs_offload"] == 0.0
        assert r["loss_max_rel_diff_vs_on"] < 1e-3  # recomputation vs offload: the same maths
    md = (out / "offload_memory.md").read_text()
    assert "| bf16 | offload-hold | ok |" in md and "reserved / allocated" in md


@pytest.mark.slow
def test_int8_memory_records_what_a_cpu_can(tmp_path):
    out = tmp_path / "int8"
    _run("int8_memory.py", out, "--precisions", "int8,bf16")
    rows = json.loads((out / "int8_memory.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["int8", "bf16"]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        d = r["diag"]
        assert d["recorded_step"] == 1 and "needs a CUDA device" in d["snapshot_reason"] and "at_peak" not in d
        st = d["saved_tensors"]
        # the accounting sees what the harness's own step-0 probe saw outside checkpointed layers
        assert st["total_bytes"] == r["saved_activation_bytes"] > 0
        assert st["tensors"] == sum(m["tensors"] for m in st["by_module"])
        assert any(".layers.*" in m["module"] for m in st["by_module"])  # decoder layers folded into one row
    assert rows[0]["ctx_held_by_function"] and not rows[1]["ctx_held_by_function"]  # bitsandbytes' ctx attributes
    md = (out / "int8_memory.md").read_text()
    assert "## int8 (gc-on)" in md and "Allocator snapshot: not taken" in md and "| module (decoder layers" in md
    assert not list(out.rglob("*.pickle"))  # never the raw snapshot


def test_the_time_limit_keeps_a_cell_from_starting():
    budget = diagcommon.Budget(10.0)
    assert budget.fits(5.0) and not budget.fits(11.0) and diagcommon.Budget(None).fits(1e9)
    budget.t0 -= 20  # the limit passed
    assert not budget.fits(0.0) and budget.left() < 0
    runner = diagcommon.CellRunner.__new__(diagcommon.CellRunner)
    runner.budget, runner.longest = budget, {}

    class Cell:
        precision = "bf16"

    assert runner.run("x:y", "bf16/on", Cell(), {}) == {"status": "not run", "error": "time limit"}
    runner.budget, runner.longest = diagcommon.Budget(30.0), {"bf16": 40.0}  # the last bf16 cell took 40 s
    assert runner.run("x:y", "bf16/on", Cell(), {})["status"] == "not run"


def test_sizes_read_well():
    assert diagcommon.size(None) == "n/a" and diagcommon.size(3 * 2**30) == "3.00 GiB"
    assert diagcommon.size(5 * 2**20) == "5.00 MiB" and diagcommon.size(2048) == "2.0 KiB"


@pytest.mark.slow
def test_the_h200_diag_job_runs_end_to_end_on_the_cpu(tmp_path):
    """scripts/h200-diag.sh's documented CPU rehearsal: the three drivers in one folder,
    each bounded by the time left, their tables printed at the end."""
    run = tmp_path / "diag"
    env = dict(os.environ, MODEL="tiny-llama", CELLS="bf16/s64/gc-off", ROUNDS="3", K="1", WARMUP="1", SEQ="64",
               OFF_PRECISIONS="bf16", INT8_PRECISIONS="int8", DEVICE="cpu", PY=sys.executable, OMP_NUM_THREADS="1",
               LORA_HARNESS_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "scripts/h200-diag.sh", str(run)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("interleaved/interleaved.md", "interleaved/interleaved.json", "offload/offload_memory.md",
              "offload/offload_memory.json", "int8/int8_memory.md", "int8/int8_memory.json"):
        assert (run / f).is_file(), f
    for f in ("== interleaved/interleaved.md", "== offload/offload_memory.md", "== int8/int8_memory.md",
              "h200-diag: done after"):
        assert f in proc.stdout
    cell = json.loads((run / "interleaved" / "interleaved.json").read_text())["cells"][0]
    assert cell["rounds"] == 3 and cell["alternation"]["ok"]
    assert json.loads((run / "interleaved" / "interleaved.json").read_text())["settings"]["time_limit"] <= 240
    assert all(r["status"] == "ok" for r in json.loads((run / "offload" / "offload_memory.json").read_text())["rows"])
