"""Crafted records and run folders for the reporter and comparison tests."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "runs"
ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "reports" / "reference" / "h200-core-2026-11-29"
GIB = 1024 ** 3


def record(cell_id, status="ok", *, steps=(0.1, 0.1, 0.1, 0.1, 0.1), vram_gib=10.0, device="cuda",
           timestamp="2026-12-01T10:00:00+0000", **extra):
    """A schema-1 record of ``cell_id`` ('model/precision/s<len>/gc-<mode>') with the
    given measured step times; tokens/s and the median follow from them as the worker's."""
    model, precision, s, gc = cell_id.split("/")
    seq_len = int(s[1:])
    rec = {"schema_version": 1, "run_id": "crafted", "cell_id": cell_id, "status": status, "error": None,
           "model": model, "precision": precision, "seq_len": seq_len, "batch_size": 1, "grad_ckpt": gc[3:],
           "device": device, "device_name": "NVIDIA H200" if device == "cuda" else "cpu",
           "memory_metric": "vram" if device == "cuda" else "rss", "timestamp": timestamp,
           "peak_rss_bytes": 2 * GIB, "losses": [3.0, 2.5, 2.0], "spec": {"warmup_steps": 1, "steps": len(steps)}}
    if status == "ok":
        med = statistics.median(steps)
        rec.update(step_times_s=list(steps), step_time_s=med, tokens_per_s=seq_len / med,
                   step_time_spread=(max(steps) - min(steps)) / med)
    else:
        rec.update(error=f"{status}: crafted", step_times_s=[], step_time_s=None, tokens_per_s=None)
    rec["peak_vram_bytes"] = int(vram_gib * GIB) if device == "cuda" and vram_gib is not None else None
    rec.update(extra)
    return rec


def write_run(folder, records, env=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (folder / "env.json").write_text(json.dumps(env or {"hostname": "test", "device": "cuda",
                                                        "gpu_name": "NVIDIA H200"}))
    (folder / "run.json").write_text(json.dumps({"run_id": folder.name,
                                                 "invocations": [{"command": f"crafted {folder.name}"}]}))
    return folder


def run(*args, cwd=ROOT):
    """``python -m <args>`` from the repository root, as a user would run it."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def one_line_error(p, code, msg):
    """The process ended with ``code`` and exactly one stderr line holding ``msg``."""
    assert p.returncode == code, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in p.stderr, p.stderr
