"""The harness's own performance, pure parts: the adaptive window's rule, the window's
spec and options, the phase clock and the parent's timers, the token sampler's
vectorised form, spreads."""

import json

import numpy as np
import pytest

from harness.cell import data
from harness.plan.options import build_config
from harness.core.phases import PhaseClock, attach_timers, fixed_cost, spread
from harness.core.window import simulate_window, window_decision
from harness.core.spec import CellSpec, WindowSpec
from harness.core.errors import SpecError

CPU = {"has_gpu": False}
RULE = dict(min_steps=5, max_steps=50, time_cap_s=30.0, stable_rel=0.01, stable_steps=3)


def test_steady_steps_stop_as_soon_as_the_minimum_allows():
    assert simulate_window([0.2] * 100, **RULE) == (5, "stable")
    # the stability rule needs stable_steps + 1 medians: with min 2 it still waits for 4 steps
    assert simulate_window([0.2] * 100, **dict(RULE, min_steps=2)) == (4, "stable")


def test_never_before_the_minimum_even_when_stable_and_over_the_cap():
    for n in range(1, 8):
        assert window_decision([10.0] * n, **dict(RULE, min_steps=8, time_cap_s=1.0)) is None
    assert window_decision([10.0] * 8, **dict(RULE, min_steps=8, time_cap_s=1.0)) == "stable"


def test_the_rule_on_a_worked_example():
    # running medians: 1.0, 1.5, 2.0, 2.0, 2.0, 2.0 -> after step 6 the last four (steps
    # 3..6) lie within 0 of each other, after step 5 the last four are 1.5, 2, 2, 2 (25%)
    times = [1.0, 2.0, 3.0, 2.0, 2.0, 2.0]
    rule = dict(RULE, min_steps=3, stable_rel=0.01)
    assert [window_decision(times[:n], **rule) for n in range(1, 7)] == [None] * 5 + ["stable"]
    # a looser threshold stops at step 5: (2.0 - 1.5) / 2.0 = 25%
    assert window_decision(times[:5], **dict(rule, stable_rel=0.25)) == "stable"
    assert window_decision(times[:5], **dict(rule, stable_rel=0.24)) is None


def test_noisy_steps_stop_on_the_time_cap():
    rng = np.random.default_rng(0)
    noisy = list(0.5 + rng.random(200))  # the median keeps moving by more than 1% for a while
    n, why = simulate_window(noisy, **dict(RULE, stable_rel=1e-6, time_cap_s=10.0))
    assert why == "time_cap" and sum(noisy[:n]) >= 10.0 > sum(noisy[:n - 1])


def test_max_steps_ends_a_window_that_never_settles():
    alternating = [0.1, 1.0] * 100
    assert simulate_window(alternating, **dict(RULE, stable_rel=1e-9, time_cap_s=1e9, max_steps=12)) == (12, "max_steps")


def test_window_spec_keeps_ids_and_old_records_load():
    fixed = CellSpec("llama-3.1-8b", "nf4", 2048, "on")
    adaptive = fixed.replace(window=WindowSpec(max_steps=30, time_cap_s=5.0))
    assert adaptive.cell_id == fixed.cell_id == "llama-3.1-8b/nf4/s2048/gc-on"  # a measurement setting, like steps
    assert CellSpec.from_dict(adaptive.to_dict()) == adaptive
    old = fixed.to_dict()
    del old["window"]  # a record written before the adaptive window existed
    assert CellSpec.from_dict(old) == fixed and fixed.max_measured_steps == 5 and adaptive.max_measured_steps == 30
    with pytest.raises(SpecError, match="below the minimum"):
        fixed.replace(steps=10, window=WindowSpec(max_steps=5))
    with pytest.raises(SpecError, match="stable-rel"):
        WindowSpec(stable_rel=0)


def test_reference_records_still_load_as_specs():
    with open("reports/reference/h200-core-2026-11-29/results.jsonl") as f:
        rec = json.loads(f.readline())
    assert CellSpec.from_dict(rec["spec"]).window is None


def test_options_for_the_window_and_the_sampler():
    cfg = build_config({"adaptive_steps": True, "max_steps": 40, "window_time_cap": 5.0, "steps": "3"}, CPU)
    w = cfg.cells[0].window
    assert (w.max_steps, w.time_cap_s, w.stable_rel, w.stable_steps) == (40, 5.0, 0.01, 3) and cfg.cells[0].steps == 3
    assert build_config({}, CPU).cells[0].window is None  # the default is unchanged: a fixed 5-step window
    with pytest.raises(SpecError, match="only apply with --adaptive-steps"):
        build_config({"max_steps": 40}, CPU)
    off = build_config({"nvml_period_ms": 0}, CPU)
    assert off.nvml_period_s == 0 and off.worker_opts()["nvml_period_s"] == 0
    with pytest.raises(SpecError, match="positive, or 0"):
        build_config({"nvml_period_ms": -1}, CPU)
    with pytest.raises(SpecError, match="needs --nvml-period-ms > 0"):
        build_config({"nvml_period_ms": 0, "vram_budget": "24"}, {"has_gpu": True, "gpus": [
            {"index": 0, "name": "H200", "memory_total_bytes": 150 * 2 ** 30}]})
    assert build_config({"int8_prequantized": True}, CPU).worker_opts()["int8_prequantized"] is True
    assert "int8_prequantized" not in build_config({}, CPU).worker_opts()
    assert build_config({"sampler_mode": "process"}, CPU).worker_opts()["sampler_mode"] == "process"
    assert "sampler_mode" not in build_config({}, CPU).worker_opts()  # the thread, as before
    with pytest.raises(SpecError, match="thread or process"):
        build_config({"sampler_mode": "fork"}, CPU)


def test_phase_clock_and_the_parents_timers():
    clock = PhaseClock("imports", start=100.0)
    for t, name in ((100.5, "model_load"), (102.0, "lora_wrap"), (102.25, "warmup"), (103.0, "measured"),
                    (105.0, "verify")):
        clock.begin(name, now=t)
    end = clock.begin(None, now=105.5)
    clock.move(0.25, "model_load", "checkpoint_write")
    worker = dict(clock.fields(), _timeline={"child_start": 99.75, "cell_start": 100.0, "body_end": end})
    rec = attach_timers(worker, t_submit=99.5, t_exit=106.0, wall_s=6.5)
    assert rec["phase_spawn_s"] == 0.25 and rec["phase_imports_s"] == 0.75 and rec["phase_teardown_s"] == 0.5
    assert rec["phase_model_load_s"] == 1.25 and rec["phase_checkpoint_write_s"] == 0.25
    assert rec["fixed_cost_s"] == 6.5 - 0.75 - 2.0 and abs(rec["phase_unaccounted_s"]) < 1e-9
    assert not any(k.startswith("_") for k in rec)
    # a job that is not a cell (or died) gets nothing invented
    assert attach_timers({"status": "ok", "_timeline": {"child_start": 1.0}}, t_submit=0.0, t_exit=2.0,
                         wall_s=2.0) == {"status": "ok"}


def test_fixed_cost_of_old_and_new_records():
    assert fixed_cost({"fixed_cost_s": 1.5, "wall_time_s": 9.0}) == (1.5, "timers")
    old = {"wall_time_s": 6.0, "warmup_step_times_s": [1.0, 0.5], "step_times_s": [0.25] * 4}
    assert fixed_cost(old) == (3.5, "approx")
    assert fixed_cost({"wall_time_s": 0.0}) == (None, "none")  # pruned / predicted: never ran


def test_vectorised_chain_is_the_loop_exactly():
    for seq, batch, seed in ((2, 1, 0), (64, 1, 1), (2048, 2, 7), (5000, 3, 11)):
        fast = data.sample_tokens(128256, seq, batch, seed)
        slow = data._sample_tokens_loop(128256, seq, batch, seed)
        assert fast.dtype == slow.dtype and fast.shape == slow.shape and (fast == slow).all()
    all7 = data.make_batches(1024, 64, 1, 7, seed=3)
    tail = data.make_batches(1024, 64, 1, 4, seed=3, start=3)  # the adaptive window's extension
    assert all((a == b).all() for a, b in zip(all7[3:], tail))


def test_spread():
    assert spread([100, 101, 99]) == pytest.approx(0.02)
    assert spread([5.0]) is None and spread([None, 3.0]) is None
