"""Checkpoints written ahead of a sweep (scripts/gpu-host.sh WRITE_AHEAD): the writer runs
beside the worker server's start, and a cell waits for it before measuring anything."""

import fcntl
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

from harness.cell.build import checkpoint_dir, wait_for_writers
from harness.core.models import get_preset

ROOT = Path(__file__).resolve().parent.parent


def _hold(lock_path, ready):
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        ready.set()
        time.sleep(1.0)


def test_a_cell_waits_while_another_process_writes_a_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold, args=(folder / ".some-model.lock", ready))
    p.start()
    assert ready.wait(30)
    assert wait_for_writers(str(tmp_path)) >= 0.5
    p.join(30)
    assert wait_for_writers(str(tmp_path)) == 0.0
    assert wait_for_writers(str(tmp_path / "none")) == 0.0


def test_write_ahead_writes_the_checkpoint_once(tmp_path):
    cmd = [sys.executable, "-m", "harness.cell.build", "tiny-llama", "--cache-dir", str(tmp_path)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "writing synthetic checkpoint" in first.stdout
    assert (checkpoint_dir(get_preset("tiny-llama"), str(tmp_path)) / ".complete").is_file()
    from harness.cell.build import write_ahead

    stamp = (checkpoint_dir(get_preset("tiny-llama"), str(tmp_path)) / ".complete").stat().st_mtime_ns
    assert write_ahead("tiny-llama", cache_dir=str(tmp_path)) == 0  # already there: nothing written
    assert (checkpoint_dir(get_preset("tiny-llama"), str(tmp_path)) / ".complete").stat().st_mtime_ns == stamp
