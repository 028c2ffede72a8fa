import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_cells_lists_ids():
    p = cli("cells", "--device", "cpu", "--precision", "nf4", "--seq-len", "64")
    assert p.returncode == 0
    assert p.stdout.split() == ["tiny-llama/nf4/s64/gc-off", "tiny-llama/nf4/s64/gc-on", "tiny-llama/nf4/s64/gc-offload"]


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, msg in [
        (("run", "--precision", "int3"), "unknown precision"),
        (("run", "--model", "gpt-17"), "unknown model"),
        (("run", "--seq-len", "lots"), "not a whole number"),
        (("run", "--device", "cpu", "--precision", "bf16", "--seq-len", "8", "--run-dir", str(blocker / "r")),
         "cannot write the run folder"),
        (("show", str(tmp_path)), "not a run folder"),
    ]:
        p = cli(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stderr.strip().startswith("lora-harness: error:") and msg in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_run_show_and_env(tmp_path):
    run_dir = tmp_path / "run"
    p = cli("run", "--device", "cpu", "--precision", "bf16", "--seq-len", "32", "--grad-ckpt", "off,unsloth",
            "--steps", "2", "--run-dir", str(run_dir))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[1/2] tiny-llama/bf16/s32/gc-off: ok" in p.stdout and "ETA" in p.stdout
    assert "tiny-llama/bf16/s32/gc-offload" in p.stdout and "2 ok" in p.stdout
    recs = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["ok", "ok"]
    s = cli("show", str(run_dir))
    assert s.returncode == 0 and "tiny-llama/bf16/s32/gc-offload" in s.stdout and "RSS" in s.stdout
    e = cli("env", "--json")
    env = json.loads(e.stdout)
    assert env["device"] == "cpu" and env["bitsandbytes"]["backend"] == "cpu"
    t = cli("env")
    assert "bitsandbytes backend" in t.stdout
