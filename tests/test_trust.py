"""Paths that used to give silently wrong results: each case fails on the harness as it
was and passes now (resume with other settings, two writers, the regression gate, bad
input, a sweep that measured nothing)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.report_helpers import FIXTURES, one_line_error, record, run, write_run

ROOT = Path(__file__).resolve().parent.parent
CELLS = ("--device", "cpu", "--precision", "bf16", "--seq-len", "16,24", "--grad-ckpt", "off", "--steps", "2",
         "--warmup-steps", "1")


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_resume_after_a_kill_reruns_exactly_the_cells_whose_settings_changed(tmp_path):
    run_dir = tmp_path / "r"
    # a sweep killed once its first cell is recorded
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", *CELLS, "--run-dir", str(run_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ((run_dir / "results.jsonl").exists() and records(run_dir)):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = records(run_dir)
    assert [r["cell_id"] for r in first] == ["tiny-llama/bf16/s16/gc-off"]
    # resumed with another LoRA rank: the recorded cell runs again (and says why), the other runs
    p = cli("run", *CELLS, "--run-dir", str(run_dir), "--resume", "--lora-rank", "8")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "tiny-llama/bf16/s16/gc-off: runs again, its stored record was made with other settings " \
           "(lora.rank 16 -> 8)" in p.stdout
    after = records(run_dir)
    assert [(r["cell_id"], r["spec"]["lora"]["rank"]) for r in after] == [
        ("tiny-llama/bf16/s16/gc-off", 16), ("tiny-llama/bf16/s16/gc-off", 8), ("tiny-llama/bf16/s24/gc-off", 8)]
    # back to rank 16: the rank-16 record stands; only the cell never measured at 16 runs
    p = cli("run", *CELLS, "--run-dir", str(run_dir), "--resume")
    assert p.returncode == 0 and "(resumed" in p.stdout
    last = records(run_dir)
    assert [(r["cell_id"], r["spec"]["lora"]["rank"]) for r in last[3:]] == [("tiny-llama/bf16/s24/gc-off", 16)]


@pytest.mark.slow
def test_a_second_sweep_on_the_same_folder_stops_and_the_first_is_untouched(tmp_path):
    run_dir = tmp_path / "r"
    first = subprocess.Popen([sys.executable, "-m", "harness", "run", *CELLS, "--run-dir", str(run_dir)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / ".lock").exists():
        time.sleep(0.1)
    second = cli("run", *CELLS, "--run-dir", str(run_dir))
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    assert second.returncode == 2
    assert second.stderr.strip().startswith(f"lora-harness: error: {run_dir} is in use by another sweep (pid "
                                            f"{first.pid} on ")
    recs = records(run_dir)
    assert [r["cell_id"] for r in recs] == ["tiny-llama/bf16/s16/gc-off", "tiny-llama/bf16/s24/gc-off"]
    assert len({r["run_id"] for r in recs}) == 1


@pytest.mark.slow
def test_a_folder_holding_other_settings_is_refused_and_the_same_settings_repeat(tmp_path):
    run_dir = tmp_path / "r"
    assert cli("run", *CELLS, "--run-dir", str(run_dir)).returncode == 0
    one_line_error(cli("run", *CELLS, "--run-dir", str(run_dir), "--steps", "3"), 2,
                   "measured with other settings (steps 2 -> 3)")
    p = cli("run", *CELLS, "--run-dir", str(run_dir))
    assert p.returncode == 0 and "repeat 1" in p.stdout
    assert [r.get("repeat") for r in records(run_dir)] == [None, None, 1, 1]


def _copy(tmp_path, name, change):
    src = FIXTURES / "cpu-mixed"
    dst = tmp_path / name
    shutil.copytree(src, dst)
    recs = [json.loads(line) for line in (dst / "results.jsonl").read_text().splitlines()]
    recs = change(recs)
    (dst / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return dst


def _steady(tmp_path):
    """The fixture with steady steps (a quiet host), so that only the changes below count."""
    def steady(recs):
        for r in recs:
            if r.get("step_time_s"):
                r["step_times_s"] = [r["step_time_s"]] * len(r.get("step_times_s") or [1, 1, 1])
                r["step_time_spread"] = 0.0
        return recs
    return _copy(tmp_path, "base", steady)


def test_compare_a_missing_metric_a_missing_cell_and_an_unstable_cell(tmp_path):
    base = _steady(tmp_path)
    recs = [json.loads(line) for line in (base / "results.jsonl").read_text().splitlines()]
    target = next(r["cell_id"] for r in recs if r["status"] == "ok" and r.get("tokens_per_s"))

    def drop_metric(rs):
        return [dict(r, tokens_per_s=None) if r["cell_id"] == target else r for r in rs]

    def drop_cell(rs):
        return [r for r in rs if r["cell_id"] != target]

    def unsteady(rs):
        out = []
        for r in rs:
            if r["cell_id"] == target:
                t = r["step_time_s"]
                r = dict(r, step_times_s=[t * 0.8, t, t * 1.2, t, t * 1.02], step_time_spread=0.4,
                         step_time_s=t * 1.02, tokens_per_s=r["tokens_per_s"] / 1.02 / 1.1)
            out.append(r)
        return out

    for name, change, code, why in [
            ("no-metric", drop_metric, 1, f"{target}: tokens_per_s"),
            ("no-cell", drop_cell, 1, f"{target}: removed ok -> -"),
            ("unsteady", unsteady, 3, f"{target}: tokens_per_s")]:
        cur = _copy(tmp_path, name, lambda rs, c=change: c(json.loads(json.dumps(rs))))
        p = cli("compare", str(base), str(cur), "--out", str(tmp_path / f"{name}.md"))
        assert p.returncode == code, (name, p.stdout + p.stderr)
        assert why in p.stdout, (name, p.stdout)
        if name == "no-metric":
            assert "missing in the current run" in (tmp_path / f"{name}.md").read_text()
        if name == "unsteady":
            assert p.stdout.startswith("UNSTABLE:") and "unstable (the current run's measured steps spread 40%" in p.stdout


def test_a_threshold_that_checks_nothing_is_an_error_and_newer_records_are_refused(tmp_path):
    base = _steady(tmp_path)
    one_line_error(cli("compare", str(base), str(base), "--fail", "peak_vram_bytes:+3%"), 2,
                   "nothing checked: no compared cell has peak_vram_bytes on both sides")
    newer = _copy(tmp_path, "newer", lambda rs: [dict(r, schema_version=99) for r in rs])
    p = cli("compare", str(base), str(newer))
    assert p.returncode == 2 and "schema version 99, newer than this harness" in p.stderr


def test_readers_say_each_problem_in_one_line_and_never_trace_back(tmp_path):
    recs = [record("m/bf16/s512/gc-off"), record("m/bf16/s1024/gc-off")]
    recs[0]["tokens_per_s"] = "fast"
    d = write_run(tmp_path / "r", recs)
    with open(d / "results.jsonl", "a") as f:
        f.write("[1, 2]\n\"text\"\n{\"cell_id\": \"cut")
    for args in (("show", str(d)), ("report", str(d), "--out", str(tmp_path / "rep")),
                 ("compare", str(d), str(d), "--out", str(tmp_path / "c.md"))):
        p = cli(*args)
        assert p.returncode == 0, (args, p.stdout + p.stderr)
        assert "Traceback" not in p.stderr and "UserWarning" not in p.stderr
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert all(line.startswith("lora-harness: warning: ") for line in lines), lines
        text = p.stderr
        assert "tokens_per_s is 'fast', not a number: read as blank" in text
        assert "line 3 is JSON but not a record (a list)" in text and "line 4 is JSON but not a record (a str)" in text
        assert "line 5 is not valid JSON" in text


def test_a_sweep_in_which_no_cell_could_run_fails_with_the_reason(tmp_path):
    p = cli("run", "--device", "cpu", "--stack", "liger", "--precision", "bf16", "--seq-len", "16", "--grad-ckpt",
            "off", "--run-dir", str(tmp_path / "r"))
    assert p.returncode == 1
    assert "no cell could run on this host; first reason: the liger stack's kernels run on a CUDA GPU only" in p.stderr
    p = run("pytest", "suites/test_matrix.py", "-p", "no:cacheprovider", "--device", "cpu", "--stack", "liger",
            "--precision", "bf16", "--seq-len", "16", "--grad-ckpt", "off", "--run-dir", str(tmp_path / "p"))
    assert p.returncode == 1 and "no cell could run on this host: all 1 cells unsupported" in p.stdout


def test_the_main_job_ends_with_the_harness_summary_and_the_next_command(tmp_path):
    p = run("pytest", "suites/", "-p", "no:cacheprovider", "--device", "cpu", "--precision", "bf16", "--seq-len",
            "16", "--grad-ckpt", "off", "--steps", "2", "--warmup-steps", "1", "--run-dir", str(tmp_path / "r"))
    assert p.returncode == 0, p.stdout[-2000:]
    tail = p.stdout.rstrip().splitlines()
    assert tail[-1].startswith(f"next: lora-harness report {tmp_path / 'r'}")
    assert "Name (time in s)" not in p.stdout  # pytest-benchmark's table only where asked for
    assert p.stdout.count("suites/test_matrix.py") == 1  # the file's name once, not after every cell
