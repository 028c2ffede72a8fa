"""The runner with workers that really segfault, hang, run out of memory and raise."""

import os
import re
import signal
import time

import pytest

from harness.run.forkserver import ForkServerRunner, classify


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    with ForkServerRunner(tmp_path_factory.mktemp("runner")) as r:
        yield r


def _run(runner, tmp_path, target, timeout=60, **args):
    log = tmp_path / f"{target}.log"
    out = runner.run_job(f"tests.workers:{target}", args, timeout_s=timeout, log_path=log)
    return out, classify(out, timeout)


def test_server_starts_and_reports_its_mode(runner):
    assert runner.ready["event"] == "ready"
    assert runner.ready["mode"] in ("fork", "spawn")


def test_ok_job_runs_in_a_fresh_process(runner, tmp_path):
    out, rec = _run(runner, tmp_path, "ok", value=7)
    assert rec["status"] == "ok" and rec["value"] == 7
    assert rec["pid"] not in (os.getpid(), runner.proc.pid)
    out2, rec2 = _run(runner, tmp_path, "ok")
    assert rec2["pid"] != rec["pid"]


def test_segfault_is_a_crash_with_the_signal_and_log(runner, tmp_path):
    out, rec = _run(runner, tmp_path, "segfault")
    assert out.signal == signal.SIGSEGV
    assert rec["status"] == "crash"
    assert "SIGSEGV" in rec["error"]
    log = (tmp_path / "segfault.log").read_text()
    assert "Fatal Python error" in log or "Segmentation fault" in log  # faulthandler's stack


def test_abort_is_a_crash(runner, tmp_path):
    out, rec = _run(runner, tmp_path, "abort")
    assert rec["status"] == "crash" and "SIGABRT" in rec["error"]


def test_hang_times_out_and_the_process_is_gone(runner, tmp_path, monkeypatch):
    pid_file = tmp_path / "hang.pid"
    t0 = time.monotonic()
    out = runner.run_job("tests.workers:hang", {}, timeout_s=3, log_path=tmp_path / "hang.log",
                         env={"HANG_PID_FILE": str(pid_file)})
    rec = classify(out, 3)
    assert rec["status"] == "timeout" and "3 s limit" in rec["error"]
    # where it hung: the innermost frame of the job's stack, dumped to its log before the kill
    assert re.search(r'stuck at File ".*tests/workers\.py", line \d+ in hang$', rec["error"]), rec["error"]
    assert "Current thread" in (tmp_path / "hang.log").read_text()
    assert time.monotonic() - t0 < 30
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_out_of_memory_is_recorded_as_oom(runner, tmp_path):
    out, rec = _run(runner, tmp_path, "oom")
    assert rec["status"] == "oom"
    assert "allocate" in rec["error"]


def test_exception_is_an_error_with_traceback(runner, tmp_path):
    out, rec = _run(runner, tmp_path, "raises")
    assert rec["status"] == "error" and "a bug in the workload" in rec["error"]
    assert "Traceback" in rec["traceback"]


def test_exit_without_result_is_a_crash(runner, tmp_path):
    out, rec = _run(runner, tmp_path, "exits_quietly")
    assert rec["status"] == "crash" and "code 3" in rec["error"]


def test_runner_survives_all_of_the_above(runner, tmp_path):
    out, rec = _run(runner, tmp_path, "ok", value=1)
    assert rec["status"] == "ok"


def test_spawn_mode_gives_the_same_outcomes(tmp_path):
    with ForkServerRunner(tmp_path, mode="spawn") as r:
        assert r.ready["mode"] == "spawn"
        out = r.run_job("tests.workers:ok", {"value": 2}, timeout_s=120, log_path=tmp_path / "ok.log")
        assert classify(out, 120)["value"] == 2
        out = r.run_job("tests.workers:segfault", {}, timeout_s=120, log_path=tmp_path / "sf.log")
        assert classify(out, 120)["status"] == "crash"
