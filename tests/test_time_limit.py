"""--time-limit for matrix sweeps: once the process has run that long no new cell starts;
the cells left are not run and not recorded (pytest: skipped, never passed), and
--resume runs them. Cells already recorded still replay."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.plan.options import build_config
from harness.core.errors import SpecError
from harness.run.sweep import Sweep

ROOT = Path(__file__).resolve().parent.parent
CPU = {"has_gpu": False}


def test_time_limit_option():
    cfg = build_config({"lh_precision": "bf16", "lh_seq_len": "32", "lh_time_limit": 30.0}, CPU)
    assert cfg.time_limit_s == 30.0
    assert not cfg.out_of_time(time.monotonic()) and cfg.out_of_time(time.monotonic() - 31)
    assert not build_config({"lh_precision": "bf16", "lh_seq_len": "32"}, CPU).out_of_time(0.0)
    with pytest.raises(SpecError, match="--time-limit must be positive"):
        build_config({"lh_precision": "bf16", "lh_seq_len": "32", "lh_time_limit": 0}, CPU)


def _past_limit(sweep_cls, tmp_path, done_index: int, **options):
    """A sweep of two cells whose 5 s limit passed 5 s ago, one cell already recorded."""
    values = {"lh_precision": "bf16", "lh_seq_len": "32,64", "lh_grad_ckpt": "off",
              "lh_run_dir": str(tmp_path / "run"), "lh_time_limit": 5.0, **options}
    cfg = build_config(values, CPU)
    sweep = sweep_cls(cfg, CPU, out=lambda s: None)
    sweep.started_at = time.monotonic() - 10
    done = cfg.cells[done_index]
    sweep.done = {done.cell_id: {"cell_id": done.cell_id, "status": "ok"}}
    return cfg, sweep, done


def test_a_sweep_past_its_limit_starts_nothing_but_replays_recorded_cells(tmp_path):
    cfg, sweep, done = _past_limit(Sweep, tmp_path, 0)
    recs = sweep.run_all()
    assert [r["cell_id"] for r in recs] == [done.cell_id] and recs[0]["resumed"]
    assert sweep.not_started == [cfg.cells[1].cell_id]
    assert sweep.launcher is None  # no worker was started for a cell that must not run


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_pytest_and_cli_skip_what_the_limit_keeps_from_starting(tmp_path):
    run = tmp_path / "run"
    common = ["--device", "cpu", "--precision", "bf16", "--seq-len", "32", "--grad-ckpt", "off,on",
              "--run-dir", str(run), "--time-limit", "0.001"]
    p = subprocess.run([sys.executable, "-m", "pytest", "suites/test_matrix.py", "-p", "no:cacheprovider",
                        "-rs", *common], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert "2 skipped" in p.stdout and "passed" not in p.stdout.split("=")[-2], p.stdout[-2000:]
    assert "--time-limit (0.001 s) reached before this cell started" in p.stdout
    assert not (run / "results.jsonl").exists() or not (run / "results.jsonl").read_text().strip()
    c = subprocess.run([sys.executable, "-m", "harness", "run", *common], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=_env())
    assert c.returncode == 1, c.stdout + c.stderr
    assert "2 cells not started: --time-limit 0.001 s reached; rerun with --resume" in c.stdout
    # with room again, --resume runs them
    c = subprocess.run([sys.executable, "-m", "harness", "run", *common[:-1], "600", "--resume", "--steps", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert c.returncode == 0, c.stdout + c.stderr
    recs = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert sorted(r["cell_id"] for r in recs) == ["tiny-llama/bf16/s32/gc-off", "tiny-llama/bf16/s32/gc-on"]


def test_the_gpu_pool_hands_out_no_cell_past_the_limit(tmp_path, monkeypatch):
    from harness.plan.gpus import FAKE_ENV
    from harness.run import executor_for

    monkeypatch.setenv(FAKE_ENV, "2")
    cfg, sweep, done = _past_limit(lambda c, f, **kw: Sweep(c, f, executor=executor_for(c), **kw), tmp_path, 1,
                                   lh_gpus="0,1")
    recs = sweep.run_all()
    assert [r["cell_id"] for r in recs] == [done.cell_id]
    assert sweep.not_started == [cfg.cells[0].cell_id] and not sweep.executor.lanes  # no worker server started
