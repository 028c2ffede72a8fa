"""scripts/h200x2-scale.sh (the two-H200 job) rehearsed on CPU: two fake GPUs, the
tiny model, two cells; the script's own commands, run folders and tables, so a broken
script is found here and not on the GPU host's clock."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scale_script_rehearsal(tmp_path):
    run = tmp_path / "scale"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LORA_HARNESS_FAKE_GPUS="2",
               LORA_HARNESS_CACHE=str(tmp_path / "cache"), MODEL="tiny-llama", SEQ="64", GRAD_CKPT="off",
               STEPS="3", RUN=str(run), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", "scripts/h200x2-scale.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode in (0, 1), out[-3000:]  # 1: on a CPU the parallel cells share cores (agree says so)
    assert "checkpoint ready in" in out and "Traceback" not in out, out[-3000:]
    for folder in ("serial", "parallel"):
        assert len((run / folder / "results.jsonl").read_text().splitlines()) == 2
    assert "GPUs used: [0, 1]; pin mismatches: 0" in out
    assert "on 1 GPU(s) (0):" in out and "on 2 GPU(s) (0,1):" in out and "cells per hour of A" in out
    assert (run / "agree.md").read_text().startswith("# Do the runs agree?")
    assert "serial rc 0, parallel rc 0" in out
