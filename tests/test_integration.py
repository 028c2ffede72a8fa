"""End to end on CPU: the matrix suite (``suites/test_matrix.py``) runs every precision x
every checkpointing mode x two lengths on the tiny model, in worker processes, and stores
what it measured. (The compatibility and stability suites: tests/test_suites_e2e.py.)"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cell.checkpointing import verify
from harness.core.axes import get_mode
from harness.cell.precision import verify_layers
from harness.core.record import RECORD_FIELDS
from harness.core.axes import GRAD_CKPT_MODES, PRECISIONS

ROOT = Path(__file__).resolve().parent.parent


def _pytest(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    bench = run_dir.parent / "bench.json"
    proc = _pytest("suites/test_matrix.py", "-p", "no:cacheprovider", "--run-dir", str(run_dir), "--device", "cpu",
                   "--lr", "3e-3", "--steps", "6", "--benchmark-json", str(bench))
    return proc, run_dir, bench


def test_every_cell_ran_and_passed(smoke_run):
    proc, run_dir, _ = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "42 passed" in proc.stdout
    assert "no GPU found" in proc.stdout or "--device cpu" in proc.stdout
    # the terminal summary's table
    assert "lora-harness results" in proc.stdout and "tiny-llama/nf4-dq/s256/gc-offload" in proc.stdout


def test_stored_records(smoke_run):
    _, run_dir, _ = smoke_run
    recs = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(recs) == len(PRECISIONS) * 2 * len(GRAD_CKPT_MODES)
    assert {(r["precision"], r["grad_ckpt"], r["seq_len"]) for r in recs} == {
        (p, g, s) for p in PRECISIONS for g in GRAD_CKPT_MODES for s in (64, 256)}
    for r in recs:
        cid = r["cell_id"]
        assert set(RECORD_FIELDS) <= set(r), cid
        assert r["status"] == "ok", (cid, r["error"])
        mode = get_mode(r["precision"])
        layers = r["loaded_layers"]
        assert verify_layers(r["precision"], layers, compute_dtype="bfloat16") == [], cid
        assert layers["lora_layers"] == 14
        if mode.quant == "4bit":
            assert layers["linear4bit"]["count"] == 14 and layers["linear8bit"]["count"] == 0
            assert layers["linear4bit"]["double_quant"] == (14 if mode.double_quant else 0)
        elif mode.quant == "int8":
            assert layers["linear8bit"]["count"] == 14 and layers["linear4bit"]["count"] == 0
        else:
            assert layers["linear4bit"]["count"] == 0 and layers["linear8bit"]["count"] == 0
            assert layers["linear"]["dtypes"] == {mode.weight_dtype: 15}
        ev = r["grad_ckpt_evidence"]
        assert ev["mode"] == r["grad_ckpt"] and verify(r["grad_ckpt"], ev) == []
        assert ev["layer_runs_forward"] == 2 * 8  # 2 layers x (2 warm-up + 6 measured) steps
        losses = r["losses"]
        assert len(losses) == 8 and all(isinstance(x, float) and math.isfinite(x) for x in losses), cid
        assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2, (cid, losses)  # the loss falls
        assert r["peak_vram_bytes"] is None and r["peak_rss_bytes"] > 0 and r["memory_metric"] == "rss"
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and len(r["step_times_s"]) == 6
        assert (run_dir / r["log"]).is_file()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["device"] == "cpu" and env["packages"]["torch"]
    assert json.loads((run_dir / "run.json").read_text())["invocations"][0]["cells"] == 42


def test_benchmark_json_holds_the_metrics(smoke_run):
    _, _, bench = smoke_run
    data = json.loads(bench.read_text())
    assert len(data["benchmarks"]) == 42
    info = data["benchmarks"][0]["extra_info"]
    assert info["status"] == "ok" and info["tokens_per_s"] > 0 and "peak_rss_bytes" in info


def test_resume_skips_recorded_cells(smoke_run):
    _, run_dir, _ = smoke_run
    proc = _pytest("suites/test_matrix.py", "-p", "no:cacheprovider", "-p", "no:benchmark", "--run-dir", str(run_dir),
                   "--device", "cpu", "--resume", "-k", "fp32 and s64", "--lr", "3e-3", "--steps", "6")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "3 passed" in proc.stdout and "resumed" in proc.stdout
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 42  # nothing ran again


def test_bad_option_is_a_usage_error(tmp_path):
    proc = _pytest("suites/test_matrix.py", "-p", "no:cacheprovider", "--precision", "int3", "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 4
    assert "lora-harness: unknown precision 'int3'" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_oom_is_a_measurement_not_a_failure(tmp_path):
    """A cell that runs out of memory is xfailed (OOM), and fails with --fail-on-oom.
    The memory limit is real: the worker's address space is capped below what a
    16k-token fp32 cell needs (about 0.7 GiB on top of the worker server)."""
    args = ["suites/test_matrix.py", "-p", "no:cacheprovider", "-p", "no:benchmark", "--device", "cpu", "--precision", "fp32",
            "--seq-len", "16384", "--grad-ckpt", "off", "--steps", "1", "--warmup-steps", "0"]
    env_cap = "LORA_HARNESS_RLIMIT_AS_EXTRA"
    os.environ[env_cap] = str(256 * 1024 ** 2)
    try:
        proc = _pytest(*args, "--run-dir", str(tmp_path / "a"))
        strict = _pytest(*args, "--run-dir", str(tmp_path / "b"), "--fail-on-oom")
    finally:
        del os.environ[env_cap]
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 xfailed" in proc.stdout and "OOM" in proc.stdout
    rec = json.loads((tmp_path / "a" / "results.jsonl").read_text())
    assert rec["status"] == "oom" and rec["peak_rss_bytes"] > 0
    assert strict.returncode == 1 and "1 failed" in strict.stdout


def test_longer_cells_after_an_oom_are_pruned(tmp_path):
    """With a real OOM at 16k tokens, the 32k cell of the same row is recorded as a pruned
    OOM without running; --no-prune runs it (and it really runs out of memory)."""
    args = ["suites/", "-p", "no:cacheprovider", "-p", "no:benchmark", "--device", "cpu", "--precision", "fp32",
            "--seq-len", "16384,32768", "--grad-ckpt", "off", "--steps", "1", "--warmup-steps", "0"]
    os.environ["LORA_HARNESS_RLIMIT_AS_EXTRA"] = str(256 * 1024 ** 2)
    try:
        proc = _pytest(*args, "--run-dir", str(tmp_path / "a"))
        unpruned = _pytest(*args, "--run-dir", str(tmp_path / "b"), "--no-prune")
    finally:
        del os.environ["LORA_HARNESS_RLIMIT_AS_EXTRA"]
    assert proc.returncode == 0 and "2 xfailed" in proc.stdout, proc.stdout[-2000:]
    recs = [json.loads(line) for line in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["oom", "oom"]
    assert "pruned" not in recs[0] and recs[1]["pruned"] is True
    assert recs[1]["pruned_by"] == "tiny-llama/fp32/s16384/gc-off" and recs[1]["wall_time_s"] == 0.0
    assert unpruned.returncode == 0, unpruned.stdout[-2000:]
    recs_b = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs_b] == ["oom", "oom"] and not any(r.get("pruned") for r in recs_b)
    assert recs_b[1]["wall_time_s"] > 0
