"""harness/trackers/gpu_busy.py: the interval arithmetic on synthetic kernels and NVML
samples, a Chrome trace read back, and the CPU path (None with a reason, the step runs)."""

import json

import pytest

from harness.cell.trackers import gpu_busy as G


def test_union_of_intervals():
    assert G.union_length([]) == 0.0
    assert G.union_length([(0, 10), (5, 15), (20, 25)]) == 20.0  # overlap counted once
    assert G.union_length([(0, 10), (2, 3)]) == 10.0  # nested
    assert G.union_length([(0, 5), (5, 10)]) == 10.0  # touching
    assert G.union_length([(3, 3), (4, 2)]) == 0.0  # empty and reversed ones are dropped
    assert G.merge_intervals([(20, 25), (0, 10), (5, 15)]) == [(0.0, 15.0), (20.0, 25.0)]


def _ev(cat, ts, dur, ph="X"):
    return {"cat": cat, "ph": ph, "ts": ts, "dur": dur, "name": cat}


def test_busy_from_a_trace():
    events = [_ev("kernel", 1000, 100), _ev("kernel", 1050, 100),  # two streams overlapping: 150 us
              _ev("gpu_memcpy", 1300, 50), _ev("gpu_memset", 1400, 10), _ev("kernel", 1500, 40),
              _ev("cuda_runtime", 900, 700), _ev("cpu_op", 900, 800), {"cat": "kernel", "ph": "i", "ts": 1}]
    b = G.busy_from_trace(events, wall_s=0.001)
    # union: 1000-1150 (150) + 1300-1350 (50) + 1400-1410 (10) + 1500-1540 (40) = 250 us of a 1000 us step
    assert b["busy_s"] == pytest.approx(250e-6) and b["busy_fraction"] == pytest.approx(0.25)
    assert b["kernels"] == 3 and b["copies"] == 2 and b["median_kernel_us"] == 100.0
    assert b["device_span_s"] == pytest.approx(540e-6) and b["busy_of_device_span"] == pytest.approx(250 / 540)
    assert b["kernel_sum_s"] == pytest.approx(240e-6) and b["reason"] is None
    empty = G.busy_from_trace([], wall_s=0.5)
    assert empty["busy_fraction"] == 0.0 and empty["median_kernel_us"] is None and empty["busy_of_device_span"] is None


def test_a_chrome_trace_is_read_back_and_removed(tmp_path):
    written = []

    class Prof:
        def export_chrome_trace(self, path):
            written.append(path)
            with open(path, "w") as f:
                json.dump({"traceEvents": [_ev("kernel", 0, 5)]}, f)

    assert G._trace_events(Prof()) == [_ev("kernel", 0, 5)]
    import os

    assert not os.path.exists(written[0])


def test_nvml_samples_inside_windows():
    # samples every 100 us: each covers the 100 us before its timestamp
    samples = [(100, 10.0), (200, 20.0), (300, 30.0), (400, 40.0), (500, 50.0)]
    # window 150-420 wholly holds the periods ending at 300 (200-300) and 400 (300-400)
    assert G.samples_in_windows(samples, [(150, 420)]) == [30.0, 40.0]
    assert G.samples_in_windows(samples, [(150, 420), (390, 500)]) == [30.0, 40.0, 50.0]
    assert G.samples_in_windows(samples, [(150, 420)], period_us=0) == [20.0, 30.0, 40.0]
    assert G.samples_in_windows(samples, [(0, 50)]) == []


def test_off_cuda_both_ways_say_why_and_the_step_still_runs():
    ran = []
    res = G.profiled_busy_fraction(lambda: ran.append(1), "cpu")
    assert ran == [1] and res["busy_fraction"] is None and "cpu" in res["reason"]
    with G.BusyProfile(None) as p:
        pass
    assert p.result()["busy_fraction"] is None and p.result()["reason"]
    nv = G.nvml_busy_fraction(None, [(0.0, 1.0)])
    assert nv["busy_fraction"] is None and "not a CUDA run" in nv["reason"]
    log = G.NvmlUtilLog(0)  # this host: NVML missing or without a device
    log.poll()
    if log.reason is not None:
        assert log.busy([(0.0, 1.0)])["busy_fraction"] is None
    log.close()
