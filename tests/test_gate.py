"""harness/trackers/gate.py: the step gate's protocol between a driver and a side, and a
real harness cell (tiny-llama, CPU, in this process) taking its steps at a gate."""

import threading
import time

import pytest

from harness.core.spec import CellSpec
from harness.cell.trackers.gate import DriverGate, GateError, GatedHooks, StepGate, make_fifos
from harness.cell.train import CellHooks, run_cell


def _pair(tmp_path, name="side"):
    go, done = make_fifos(tmp_path, name)
    return DriverGate(name, go, done), StepGate(go, done)


def _connect(driver, timeout=10):
    t = time.monotonic()
    while not driver.try_connect():
        assert time.monotonic() - t < timeout
        time.sleep(0.005)


def test_commands_reports_and_the_last_word(tmp_path):
    driver, side = _pair(tmp_path)
    seen = []

    def side_loop():
        for i in range(10):
            cmd = side.wait_turn()
            seen.append(cmd)
            if cmd == "stop":
                break
            side.step_done(i, 0.5 + i, busy={"x": i} if cmd == "profile" else None)
        side.end(note="bye")

    t = threading.Thread(target=side_loop)
    t.start()
    assert not driver.connected
    _connect(driver)
    assert driver.recv(5)["event"] == "ready"
    driver.send("go")
    first = driver.recv(5)
    assert first["event"] == "done" and first["step"] == 0 and first["dt"] == 0.5
    assert first["t0"] <= first["t1"] and first["w0"] <= first["w1"]
    driver.send("profile")
    assert driver.recv(5)["busy"] == {"x": 1}
    driver.send("stop")
    last = driver.recv(5)
    t.join(5)
    assert last == {"event": "end", "pid": last["pid"], "note": "bye"} and seen == ["go", "profile", "stop"]
    with pytest.raises(GateError, match="closed its gate"):
        driver.recv(5)
    driver.close()


def test_a_side_that_runs_out_of_steps_sends_its_last_report_with_its_end(tmp_path):
    driver, side = _pair(tmp_path)

    def side_loop():
        assert side.wait_turn() == "go"
        side.step_done(0, 0.25)
        side.end()

    t = threading.Thread(target=side_loop)
    t.start()
    _connect(driver)
    assert driver.recv(5)["event"] == "ready"
    driver.send("go")
    end = driver.recv(5)
    t.join(5)
    assert end["event"] == "end" and end["last"]["dt"] == 0.25


def test_the_side_reads_a_vanished_driver_as_stop_and_the_driver_a_silent_side_as_an_error(tmp_path):
    driver, side = _pair(tmp_path)
    got = []
    t = threading.Thread(target=lambda: got.append(side.wait_turn()))
    t.start()
    _connect(driver)
    assert driver.recv(5)["event"] == "ready"
    with pytest.raises(GateError, match="no word"):
        driver.recv(0.2)  # the side waits for a command: silent
    with pytest.raises(GateError, match="ended without a word"):
        driver.recv(5, alive=lambda: False)
    driver.close()
    t.join(5)
    assert got == ["stop"]
    assert side.wait_turn() == "stop"  # and stays so


class _Sampler:
    """A MemorySampler's thread, as the gate sees it."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = None
        self.starts = 0

    def start(self):
        self.starts += 1
        self._thread = threading.Thread(target=self._stop.wait)
        self._thread.start()
        return self


class _Inner(CellHooks):
    def __init__(self):
        self.calls = []

    def before_step(self, step, sync):
        self.calls.append(("before", step))

    def after_step(self, step, dt):
        self.calls.append(("after", step))


def test_gated_hooks_pause_the_sampler_and_delegate(tmp_path):
    go, done = make_fifos(tmp_path, "h")
    driver = DriverGate("h", go, done)
    sampler = _Sampler().start()
    inner = _Inner()
    hooks = GatedHooks(inner, [go, done], sampler)
    assert hooks.nvml_ordinal == 0  # the wrapped hooks' attributes
    t = threading.Thread(target=lambda: (hooks.before_step(0, None), hooks.after_step(0, 0.1),
                                         hooks.before_step(1, None) is False and hooks.before_step(2, None)))
    t.start()
    _connect(driver)
    assert driver.recv(5)["event"] == "ready"
    assert not sampler._thread.is_alive()  # paused while the cell waits
    driver.send("go")
    assert driver.recv(5)["dt"] == 0.1
    driver.send("stop")
    t.join(5)
    out = {}
    hooks.after_train(None, out)
    assert driver.recv(5)["event"] == "end"
    assert out["step_gate"]["stopped_by_driver"] and out["step_gate"]["sampler_pauses"] == 2
    assert sampler.starts == 3 and sampler._thread.is_alive()  # running again after each wait
    assert inner.calls == [("before", 0), ("after", 0), ("before", 1), ("before", 2)]
    sampler._stop.set()


def test_a_harness_cell_steps_at_the_gate_and_stops_when_told(tmp_path):
    go, done = make_fifos(tmp_path, "cell")
    driver = DriverGate("cell", go, done)
    spec = CellSpec(model="tiny-llama", precision="fp32", seq_len=32, warmup_steps=1, steps=6).to_dict()
    rec = {}
    t = threading.Thread(target=lambda: rec.update(run_cell(spec, {"device": "cpu", "cache_dir": str(tmp_path),
                                                                   "step_gate": [go, done]})))
    t.start()
    _connect(driver, timeout=120)
    assert driver.recv(120)["event"] == "ready"
    reports = []
    for cmd in ("go", "go", "profile"):
        driver.send(cmd)
        reports.append(driver.recv(60))
    driver.send("stop")
    assert driver.recv(60)["event"] == "end"
    t.join(120)
    assert rec["status"] == "ok", rec.get("error")
    # one warm-up and two measured steps ran, then the window ended at the gate (3 of 6 steps unrun)
    assert rec["measured_steps"] == 2 and rec["window_rule"] == "gate" and len(rec["losses"]) == 3
    assert [r["step"] for r in reports] == [0, 1, 2]
    assert [r["dt"] for r in reports] == rec["warmup_step_times_s"] + rec["step_times_s"]  # the timer's own figures
    assert rec["step_gate"]["profiled_steps"] == [2] and rec["step_gate"]["busy"]["busy_fraction"] is None
    assert all(p["t1"] <= q["t0"] for p, q in zip(reports, reports[1:]))
    assert rec["grad_ckpt_evidence"]["steps_observed"] == 3  # the proofs saw the steps that ran


def test_a_side_waits_for_its_driver_only_so_long(tmp_path):
    go, done = make_fifos(tmp_path, "late")
    side = StepGate(go, done, connect_timeout_s=0.2)
    t = time.monotonic()
    assert side.wait_turn() == "stop" and side.closed
    assert 0.15 < time.monotonic() - t < 5
