"""Issue 7's H200 jobs, rehearsed on this CPU host (device time is scarce: a mistake here
must not be found on the H200).

- scripts/h200-perf.sh end to end on tiny-llama (its documented CPU rehearsal): the
  overhead driver (bare loop vs harness vs sampler off), both repeatability runs and the
  sweep-cost tables. The bare loop must do the harness cell's work: same losses, exactly.
- scripts/h200-reference.sh against the fake H200 (tests/fake_gpu.py): its two pytest
  commands parse, the default matrix then the full-length rows land in one run folder,
  the second resumes what the first recorded, and the closing check says complete.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def perf_job(tmp_path_factory):
    run = tmp_path_factory.mktemp("h200-perf") / "run"
    env = dict(os.environ, MODEL="tiny-llama", CELLS="bf16/s64/gc-on,nf4/s64/gc-on", REPS="1", STEPS="2",
               WARMUP="1", REP_STEPS="1", RUN=str(run), PY=sys.executable, OMP_NUM_THREADS="1",
               LORA_HARNESS_CACHE=str(run.parent / "cache"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "scripts/h200-perf.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    return proc, run


def test_perf_job_runs_and_prints_its_tables(perf_job):
    proc, run = perf_job
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("overhead/overhead.md", "overhead/overhead.json", "overhead/sweep-cost.md",
              "repeatability-overhead/repeatability.md", "repeatability/repeatability.json",
              "repeatability/sweep-cost.md", "before/sweep-cost.md"):
        assert (run / f).is_file(), f
    assert "== overhead/overhead.md" in proc.stdout and "h200-perf: done" in proc.stdout


def test_overhead_table_compares_the_same_work(perf_job):
    _, run = perf_job
    data = json.loads((run / "overhead" / "overhead.json").read_text())
    rows = {r["cell"]: r for r in data["rows"]}
    assert set(rows) == {"bf16/s64/gc-on", "nf4/s64/gc-on"}
    for r in rows.values():
        assert r["runs"] == {"bare": 1, "harness": 1, "harness-nvml-off": 1, "harness-sampler-process": 1}
        assert r["sampler_process_ratio"] is not None
        assert r["speed_ratio"] == pytest.approx(r["harness_tokens_per_s"] / r["bare_tokens_per_s"])
        assert r["sampler_ratio"] == pytest.approx(r["harness_tokens_per_s"] / r["harness_nvml_off_tokens_per_s"])
        # CPU: no allocator peak, reported as such, never as a number
        assert r["bare_torch_peak_allocated_bytes"] is None and r["memory_pass"] is None
        # the bare loop trains the same model on the same tokens: identical losses
        assert r["loss_max_rel_diff_first_run"] == 0.0
    md = (run / "overhead" / "overhead.md").read_text()
    assert "| n/a | n/a | n/a | n/a |" in md
    harness = [json.loads(x) for x in (run / "overhead" / "harness-run" / "results.jsonl").read_text().splitlines()]
    assert {r["memory_sampler"] for r in harness} == {"on", "off"}
    assert {r.get("sampler_mode") for r in harness} == {"thread", "process", None}  # None: sampler off
    assert all(r["measured_steps"] == 2 and r["spec"]["warmup_steps"] == 1 for r in harness)


def test_repeatability_tables(perf_job):
    _, run = perf_job
    rows = json.loads((run / "repeatability" / "repeatability.json").read_text())["rows"]
    assert {r["cell"] for r in rows} == {"tiny-llama/bf16/s64/gc-on", "tiny-llama/nf4/s64/gc-on"}
    assert all(r["repeats"] == 3 and r["memory_pass"] is None and r["speed_pass"] is not None for r in rows)
    from_overhead = (run / "repeatability-overhead" / "repeatability.md").read_text()
    assert "tiny-llama/nf4/s64/gc-on/nvml-off" in from_overhead  # sampler on and off grouped apart
    cost = (run / "repeatability" / "sweep-cost.md").read_text()
    assert "model load" in cost and "teardown" in cost and "(timers)" in cost


@pytest.fixture(scope="module")
def reference_job(tmp_path_factory):
    run = tmp_path_factory.mktemp("h200-ref") / "run"
    env = dict(os.environ, RUN=str(run), PY=sys.executable, PYTEST_EXTRA="-p tests.fake_gpu", PYTHONPATH=str(ROOT))
    first = subprocess.run(["bash", "scripts/h200-reference.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    second = subprocess.run(["bash", "scripts/h200-reference.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    return first, second, run


def test_reference_job_runs_both_selections_into_one_folder(reference_job):
    first, second, run = reference_job
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    recs = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    ids = [r["cell_id"] for r in recs]
    assert len(ids) == len(set(ids)) == 36 + 30  # the full rows' 512 / 2048 / 8192 cells were resumed
    full = [r for r in recs if r["seq_len"] in (256, 1024, 4096, 16384, 32768)]
    assert len(full) == 30 and all(r["spec"]["window"] is None and r["spec"]["steps"] == 5 for r in full)
    assert {r["precision"] for r in recs} == {"fp32", "bf16", "int8", "nf4"}
    assert "h200-reference: reference run complete" in first.stdout and "66 of 66 cells recorded" in first.stdout


def test_reference_job_continues_without_measuring_twice(reference_job):
    _, second, run = reference_job
    assert second.returncode == 0, second.stdout[-3000:]
    assert len((run / "results.jsonl").read_text().splitlines()) == 66
    assert "reference run complete" in second.stdout
