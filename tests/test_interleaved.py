"""benchmarks/interleaved.py: three live training processes (the bare loop, the harness
cell with the sampler on and off) taking turns step by step, rehearsed on the CPU with
tiny-llama; and the driver's round loop against fake sides (the time limit)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import interleaved  # noqa: E402
from interleaved_report import markdown  # noqa: E402

ROUNDS, K, WARM = 4, 2, 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("interleaved") / "out"
    cmd = [sys.executable, "benchmarks/interleaved.py", "--model", "tiny-llama", "--cells", "bf16/s64/gc-off",
           "--rounds", str(ROUNDS), "--steps-per-turn", str(K), "--warmup-steps", str(WARM), "--device", "cpu",
           "--cache-dir", str(out.parent / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    return proc, out


@pytest.mark.slow
def test_the_sides_take_turns_and_the_tables_say_so(run):
    proc, out = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "interleaved.json").read_text())
    (cell,) = data["cells"]
    assert cell["cell"] == "bf16/s64/gc-off" and cell["rounds"] == ROUNDS and not cell["error"]
    assert set(cell["sides"]) == {"bare", "harness", "harness-nvml-off"}
    assert all(s["status"] == "ok" and s["round_steps"] == ROUNDS * K for s in cell["sides"].values())
    # really alternated: no two steps overlap in time, and the rounds ran in the planned order
    assert cell["alternation"] == {"steps": 3 * (WARM + ROUNDS * K + 1), "overlapping_steps": 0,
                                   "order_as_scheduled": True, "ok": True}
    firsts = [r["order"][0] for r in cell["round_times"]]
    assert len(set(firsts)) > 1  # no side always goes first
    reports = sorted(cell["reports"], key=lambda r: r["t0"])
    assert all(p["t1"] <= q["t0"] for p, q in zip(reports, reports[1:]))
    comps = cell["comparisons"]
    for key in ("harness_vs_bare", "sampler_cost"):
        c = comps[key]
        assert c["n"] == ROUNDS and len(c["ratios"]) == ROUNDS and c["ci"][0] <= c["geomean_ratio"] <= c["ci"][1]
        assert c["verdict"] in ("met", "missed", "cannot tell") and c["half_width"] > 0
    assert comps["harness_vs_bare"]["target"] == "ratio >= 0.97" and comps["sampler_cost"]["target"] == "cost < 1%"
    assert comps["torch_peak_allocated"]["geomean_ratio"] is None  # CPU: no allocator peak, never a number
    # the same model, tokens and optimizer: identical losses on the CPU
    steps = WARM + ROUNDS * K + 1
    assert cell["losses_vs_bare"] == {n: {"compared": steps, "max_rel_diff": 0.0, "same_for_steps": steps}
                                      for n in ("harness", "harness-nvml-off")}
    assert cell["sides"]["harness"]["busy_profiled"]["reason"]  # off CUDA: None with a reason
    md = (out / "interleaved.md").read_text()
    assert "| harness / bare tokens/s | ratio >= 0.97 | 4 |" in md and "| sampler on / off tokens/s | cost < 1% |" in md
    assert "Turns never overlapped and ran as scheduled: yes" in md


@pytest.mark.slow
def test_the_harness_records_come_from_gated_cells(run):
    _, out = run
    for folder, sampler in (("harness-run", "on"), ("harness-nvml-off-run", "off")):
        (rec,) = [json.loads(x) for x in (out / folder / "results.jsonl").read_text().splitlines()]
        assert rec["status"] == "ok" and rec["window_rule"] == "gate" and rec["memory_sampler"] == sampler
        assert rec["measured_steps"] == ROUNDS * K + 1 and rec["spec"]["steps"] == ROUNDS * K + 2
        assert rec["step_gate"]["stopped_by_driver"] and rec["step_gate"]["profiled_steps"] == [WARM + ROUNDS * K]
    assert (out / "harness-run" / "results.jsonl").read_text().count("/interleaved\"") >= 1
    bare = json.loads(next((out / "bare").glob("*.json")).read_text())
    assert bare["step_gate"]["stopped_by_driver"] and len(bare["step_times_s"]) == ROUNDS * K


class _FakeGate:
    """A side that answers every command at once with a 10 ms step."""

    connected = True

    def __init__(self, name):
        self.name, self.cmds = name, []

    def send(self, cmd):
        self.cmds.append(cmd)

    def recv(self, timeout, alive=None):
        t = time.monotonic()
        time.sleep(0.01)
        busy = {"busy_fraction": None, "reason": "fake"} if self.cmds[-1] == "profile" else None
        return {"event": "done", "dt": 0.01, "t0": t, "t1": time.monotonic(), "w0": time.time() - 0.01,
                "w1": time.time(), "busy": busy}


def test_the_time_limit_ends_the_rounds_and_the_profile_step_still_runs():
    sides = {n: interleaved.Side(n, _FakeGate(n)) for n in ("bare", "harness")}
    a = SimpleNamespace(warmup_steps=1, rounds=1000, steps_per_turn=2, order="abba", step_timeout=5)
    state = {"reports": [], "rounds": [], "stopped": None, "error": None}
    nvml = SimpleNamespace(poll=lambda: None)
    interleaved._turns(a, sides, time.monotonic() + 0.3, nvml, state)
    assert state["stopped"] == "time limit" and 2 <= len(state["rounds"]) < 20
    for s in sides.values():
        assert s.gate.cmds[0] == "go" and s.gate.cmds[-1] == "profile" and s.busy == {"busy_fraction": None,
                                                                                        "reason": "fake"}


def test_a_cell_the_time_limit_kept_from_starting_is_said_so():
    md = markdown({"host": "CPU", "elapsed_s": 3.0, "cells": [{"cell": "bf16/s64/gc-off", "skipped": "time limit"}]})
    assert "## bf16/s64/gc-off" in md and "Not run: time limit." in md


def test_alternation_is_judged_on_whole_rounds():
    from interleaved_report import alternation

    def rep(side, t0, t1, rnd=None):
        return {"side": side, "t0": t0, "t1": t1, "phase": "round" if rnd is not None else "warmup", "round": rnd}

    rounds = [{"round": 0, "order": ["a", "b"], "times": {"a": [1], "b": [1]}}]
    reports = [rep("a", 0, 1), rep("b", 1, 2), rep("a", 2, 3, 0), rep("b", 3, 4, 0), rep("b", 4, 5, 1)]  # round 1 cut short
    assert alternation(reports, rounds) == {"steps": 5, "overlapping_steps": 0, "order_as_scheduled": True, "ok": True}
    assert not alternation([rep("b", 2, 3, 0), rep("a", 3, 4, 0)], rounds)["order_as_scheduled"]
    assert alternation([rep("a", 0, 2, 0), rep("b", 1, 3, 0)], rounds)["overlapping_steps"] == 1


def test_losses_say_how_long_the_sides_trained_together():
    """On a GPU the sides drift apart after a few steps (non-deterministic kernels) and one
    spike later makes the largest difference huge: the report says when they parted."""
    import interleaved_report

    got = interleaved_report._losses({"bare": {"losses": [12.8, 11.5, 6.4, 3.8, 1.7, 1.7]},
                                      "harness": {"losses": [12.8, 11.5, 6.4, 3.79, 20.6, 1.7]}})
    h = got["harness"]
    assert h["compared"] == 6 and h["same_for_steps"] == 3 and h["max_rel_diff"] > 10
    # the committed H100 cell, rendered again: its sides parted after 5 steps
    cell = json.loads((ROOT / "reports/reference/h100-overhead-2026-12-05/interleaved.json").read_text())["cells"][1]
    bare = json.loads((ROOT / "reports/reference/h100-overhead-2026-12-05/bare/bf16_s2048_gc-on.json").read_text())
    harness = [json.loads(line) for line in (ROOT / "reports/reference/h100-overhead-2026-12-05/harness-run/"
                                             "results.jsonl").read_text().splitlines()]
    losses = next(r["losses"] for r in harness if r["cell_id"].startswith("llama-3.1-8b/bf16/s2048/gc-on"))
    cell["losses_vs_bare"] = interleaved_report._losses({"bare": bare, "harness": {"losses": losses}})
    md = "\n".join(interleaved_report._cell_md(cell))
    assert "Losses, harness vs bare (174 steps): the same for the first 5 steps, then apart (within 0.1%)" in md
