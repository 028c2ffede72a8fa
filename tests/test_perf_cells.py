"""Issue 7 on real cells (tiny-llama, CPU, through the harness's Sweep): the phase timers,
the sampler switched off, the adaptive window, and int8 from a pre-quantised checkpoint."""

import dataclasses

import pytest

from harness.core import host as env_mod
from harness.plan.options import build_config
from harness.core.phases import PHASES, phase_field
from harness.core.spec import WindowSpec
from harness.run.sweep import Sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf")
    cfg = build_config({"model": "tiny-llama", "precision": "bf16", "seq_len": "64", "grad_ckpt": "off",
                        "steps": "3", "warmup_steps": 1, "device": "cpu", "run_dir": str(root / "run"),
                        "cache_dir": str(root / "cache")}, env_mod.quick_facts())
    with Sweep(cfg, env_mod.quick_facts(), out=lambda s: None) as sw:
        yield sw


def _run(sweep, cell, **config_changes):
    base = sweep.config
    sweep.config = dataclasses.replace(base, **config_changes)
    try:
        rec = sweep.run(cell)
    finally:
        sweep.config = base
    assert rec["status"] == "ok", rec.get("error")
    return rec


def test_every_phase_is_timed_and_they_add_up_to_the_wall_time(sweep):
    cell = sweep.config.cells[0].replace(tag="timers")
    rec = _run(sweep, cell)
    parts = [rec[phase_field(p)] for p in PHASES]
    assert all(isinstance(x, float) and x >= 0 for x in parts), dict(zip(PHASES, parts))
    assert sum(parts) <= rec["wall_time_s"] + 1e-6
    assert abs(rec["phase_unaccounted_s"]) < 0.01  # the phases tile the cell's timeline
    assert rec["fixed_cost_s"] == pytest.approx(rec["wall_time_s"] - rec["phase_warmup_s"] - rec["phase_measured_s"])
    # the step timer's figures sit inside their phases
    assert sum(rec["step_times_s"]) <= rec["phase_measured_s"] and sum(rec["warmup_step_times_s"]) <= rec["phase_warmup_s"]
    # load_time_s (the model loader's own timer) lies inside the load phase
    assert rec["load_time_s"] <= rec["phase_model_load_s"] + rec["phase_checkpoint_write_s"] and rec["phase_spawn_s"] < 5
    assert rec["measured_steps"] == 3 and rec["window_rule"] == "fixed" and len(rec["losses"]) == 4
    assert not any(k.startswith("_t_") for k in rec)
    # the libraries' objects (preloaded by the server) are frozen out of the collector's reach
    assert rec["gc_frozen_objects"] > 100_000
    assert len(rec["gc_pauses"]["collections"]) == 3 and rec["gc_pauses"]["collections"][0] > 0


def test_the_sampler_can_be_switched_off_and_the_record_says_so(sweep):
    cell = sweep.config.cells[0]
    on = _run(sweep, cell.replace(tag="sampler-on"))
    off = _run(sweep, cell.replace(tag="sampler-off"), nvml_period_s=0.0)
    assert on["memory_sampler"] == "on" and on["nvml_samples"] > 0 and on["peak_rss_sampled_bytes"]
    assert off["memory_sampler"] == "off" and off["nvml_samples"] == 0
    assert off["peak_vram_bytes"] is None and off["nvml_period_s"] is None and off["peak_rss_sampled_bytes"] is None
    assert off["peak_rss_bytes"] > 0  # the kernel's high-water mark needs no sampler
    assert off["losses"] == on["losses"]  # the same training either way
    proc = _run(sweep, cell.replace(tag="sampler-process"), sampler_mode="process")
    assert on["sampler_mode"] == "thread" and proc["sampler_mode"] == "process" and proc["nvml_error"] is None
    assert proc["nvml_samples"] > 0 and proc["peak_rss_sampled_bytes"] > 100 * 2 ** 20
    assert proc["losses"] == on["losses"]


def test_the_adaptive_window_runs_past_its_batches_with_the_same_data(sweep):
    """A window that never settles runs to max_steps; the batches it builds on the way are
    the ones a fixed window of that length uses (identical losses)."""
    base = sweep.config.cells[0]
    adaptive = _run(sweep, base.replace(tag="adaptive", steps=2,
                                        window=WindowSpec(max_steps=9, time_cap_s=1e6, stable_rel=1e-12)))
    fixed = _run(sweep, base.replace(tag="fixed9", steps=9))
    assert adaptive["window_rule"] == "max_steps" and adaptive["measured_steps"] == 9
    assert adaptive["losses"] == fixed["losses"] and len(adaptive["losses"]) == 10
    assert adaptive["grad_ckpt_evidence"]["steps_observed"] == 10
    assert adaptive["spec"]["window"]["max_steps"] == 9 and adaptive["cell_id"].endswith("/adaptive")
    stops = _run(sweep, base.replace(tag="adaptive-cap", steps=2,
                                     window=WindowSpec(max_steps=50, time_cap_s=1e-9, stable_rel=1e-12)))
    assert stops["window_rule"] == "time_cap" and stops["measured_steps"] == 2  # the minimum, not less


def test_int8_from_a_prequantised_checkpoint_is_the_same_model(sweep):
    base = sweep.config.cells[0].replace(precision="int8", grad_ckpt="on")
    converted = _run(sweep, base.replace(tag="int8-convert"))
    first = _run(sweep, base.replace(tag="int8-prequantised"), int8_prequantized=True)  # writes the int8 folder
    again = _run(sweep, base.replace(tag="int8-prequantised-2"), int8_prequantized=True)  # loads it
    assert "checkpoint_prequantized" not in converted
    assert first["checkpoint_prequantized"] and first.get("checkpoint_written_in_cell")
    assert again["checkpoint_prequantized"] and not again.get("checkpoint_written_in_cell")
    assert "-int8-" in again["checkpoint"] and again["checkpoint"] != converted["checkpoint"]
    for rec in (first, again):
        assert rec["loaded_layers"] == converted["loaded_layers"]  # the precision proof holds
        assert rec["loaded_layers"]["linear8bit"]["count"] > 0
        assert rec["losses"] == converted["losses"]  # the same int8 weights and scales
