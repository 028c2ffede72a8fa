"""Issue 8 end to end on CPU: real tiny-llama cells in real worker processes, spread over
two fake GPUs (LORA_HARNESS_FAKE_GPUS=2: the parent sees two GPUs, each worker server is
pinned with CUDA_VISIBLE_DEVICES, the cells themselves run on the CPU)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LORA_HARNESS_FAKE_GPUS="2")
CELLS = ("--precision", "bf16,fp32,fp16", "--seq-len", "64,128", "--grad-ckpt", "off", "--steps", "20")


def _cli(*args, env=ENV, timeout=300):
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]


def _pinned_to(pid):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"CUDA_VISIBLE_DEVICES=")), None)


class Crasher(threading.Thread):
    """Kills the first cell that starts on fake GPU 1 with SIGSEGV (a worker that crashes):
    watches the cells' logs for the worker's pid and reads its pinning from /proc."""

    def __init__(self, run_dir):
        super().__init__(daemon=True)
        self.logs, self.victim, self.stop = run_dir / "logs", None, threading.Event()

    def run(self):
        seen = set()
        while not self.stop.is_set() and self.victim is None:
            for log in self.logs.glob("*.log") if self.logs.is_dir() else ():
                if log in seen:
                    continue
                m = re.match(r"\[worker (\d+)\]", log.read_text(errors="replace"))
                if not m:
                    continue
                seen.add(log)
                pid = int(m.group(1))
                if _pinned_to(pid) == "1":
                    try:
                        os.kill(pid, signal.SIGSEGV)
                        self.victim = log.name
                    except ProcessLookupError:
                        pass  # it finished first: take the next one
            time.sleep(0.005)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pool") / "run"
    crasher = Crasher(run_dir)
    crasher.start()
    proc = _cli("run", "--gpus", "0,1", *CELLS, "--run-dir", str(run_dir))
    out, _ = proc.communicate(timeout=300)
    crasher.stop.set()
    return proc.returncode, out, run_dir, crasher.victim


def test_cells_spread_over_both_gpus_each_pinned_to_its_own(pooled):
    code, out, run_dir, victim = pooled
    recs = _records(run_dir)
    assert len(recs) == 6, out
    ran = [r for r in recs if r["status"] == "ok"]
    assert {r["gpu_index"] for r in ran} == {0, 1}, out
    for r in ran:  # what the worker process itself saw
        assert r["cuda_visible_devices"] == str(r["gpu_index"]) and r["gpu_uuid"] == f"FAKE-GPU-{r['gpu_index']}"
        assert r["gpu_pool"] == [0, 1] and r["device"] == "cpu" and r["gpu_name"] is None
    assert re.search(r"\[\d/6\] gpu1 tiny-llama/", out) and re.search(r"\[\d/6\] gpu0 tiny-llama/", out)
    env = json.loads((run_dir / "env.json").read_text())
    assert [g["index"] for g in env["gpu_pool"]] == [0, 1] and env["cuda_visible_devices"] == "0"
    assert (run_dir / "logs" / "gpu0" / "forkserver.log").is_file() and (run_dir / "logs" / "gpu1" / "forkserver.log").is_file()


def test_a_crash_on_one_gpu_does_not_stop_the_other(pooled):
    code, out, run_dir, victim = pooled
    assert victim, "no cell was caught running on GPU 1"
    recs = _records(run_dir)
    crashed = [r for r in recs if r["status"] == "crash"]
    assert len(crashed) == 1 and "SIGSEGV" in crashed[0]["error"] and crashed[0]["gpu_index"] == 1
    assert [r["status"] for r in recs].count("ok") == 5
    after = recs[recs.index(crashed[0]) + 1:]
    assert any(r["gpu_index"] == 1 and r["status"] == "ok" for r in after), "GPU 1 took no cell after its crash"
    assert code == 1 and "1 crash" in out  # a crash fails the run, as in a serial sweep


def test_cells_per_hour_and_resume(pooled):
    code, out, run_dir, _ = pooled
    t = json.loads((run_dir / "run.json").read_text())["invocations"][-1]["throughput"]
    assert t["gpus"] == [0, 1] and t["cells_run"] == 6 and t["cells_per_hour"] > 0 and t["worker_start_s"] > 0
    assert "cells/hour" in out
    show = subprocess.run([sys.executable, "-m", "harness", "show", str(run_dir)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert "throughput: 6 cells in" in show.stdout and "on 2 GPU(s) (0,1)" in show.stdout
    # --resume with one more length: the six recorded cells are skipped, the three new ones run
    proc = _cli("run", "--gpus", "0,1", *CELLS[:3], "64,128,256", *CELLS[4:], "--run-dir", str(run_dir), "--resume")
    out2, _ = proc.communicate(timeout=300)
    recs = _records(run_dir)
    assert len(recs) == 9 and out2.count("resumed") == 6, out2
    assert all(r["status"] == "ok" for r in recs[6:]) and {r["seq_len"] for r in recs[6:]} == {256}


def test_pruning_decides_as_in_a_serial_sweep(tmp_path):
    """A real OOM (the workers' address space is capped) at 16k tokens: the 32k cell of the
    same row is recorded as pruned and never started, although the other GPU was free."""
    run_dir = tmp_path / "run"
    env = dict(ENV, LORA_HARNESS_RLIMIT_AS_EXTRA=str(256 * 1024 ** 2))
    proc = _cli("run", "--gpus", "0,1", "--precision", "fp32", "--seq-len", "64,16384,32768", "--grad-ckpt", "off",
                "--steps", "1", "--warmup-steps", "0", "--run-dir", str(run_dir), env=env)
    out, _ = proc.communicate(timeout=300)
    recs = {r["seq_len"]: r for r in _records(run_dir)}
    assert recs[64]["status"] == "ok", out
    assert recs[16384]["status"] == "oom" and not recs[16384].get("pruned"), out
    assert recs[32768]["pruned"] is True and recs[32768]["pruned_by"] == "tiny-llama/fp32/s16384/gc-off"
    assert recs[32768]["wall_time_s"] == 0.0 and "gpu_index" not in recs[32768]
    assert not (run_dir / "logs" / "tiny-llama__fp32__s32768__gc-off.log").exists()


def test_pytest_suites_with_gpus(pooled, tmp_path):
    """pytest runs the selected cells over the pool first; the tests, the summary table,
    pytest-benchmark's extra_info and --baseline work as in a serial session."""
    _, _, baseline, _ = pooled
    run_dir, bench = tmp_path / "run", tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "pytest", "suites/test_matrix.py", "-p", "no:cacheprovider",
                        "--gpus", "0,1", "--precision", "bf16,fp32", "--seq-len", "64", "--grad-ckpt", "off",
                        "--run-dir", str(run_dir), "--baseline", str(baseline), "--baseline-fail", "tokens_per_s:-99%",
                        "--benchmark-json", str(bench)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "2 passed" in p.stdout and "lora-harness results" in p.stdout
    assert "lora-harness: baseline: no regression: 2 cells compared" in p.stdout
    assert re.search(r"\[\d/2\] gpu\d tiny-llama/bf16/s64/gc-off: ok", p.stdout)
    recs = _records(run_dir)
    assert sorted(r["gpu_index"] for r in recs) == [0, 1]  # two rows, free GPUs: one each
    info = {b["extra_info"]["cell_id"]: b["extra_info"] for b in json.loads(bench.read_text())["benchmarks"]}
    assert {i["gpu_index"] for i in info.values()} == {0, 1} and all(i["wall_time_s"] > 0 for i in info.values())


def test_no_gpu_is_one_line_error():
    env = dict(ENV)
    env.pop("LORA_HARNESS_FAKE_GPUS")
    p = subprocess.run([sys.executable, "-m", "harness", "run", "--gpus", "0,1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "lora-harness: error: no GPU found on this host" in p.stderr and "--gpus needs NVIDIA GPUs" in p.stderr
    q = subprocess.run([sys.executable, "-m", "pytest", "suites/test_matrix.py", "-p", "no:cacheprovider", "--gpus",
                        "all"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert q.returncode == 4 and "no GPU found on this host" in q.stderr + q.stdout
