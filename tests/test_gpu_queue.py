"""The GPU work queue (scripts/gpu_queue.py): order, time limits, resuming, the status
table. The steps' own commands run on a GPU host; here they are replaced by small
commands that leave the files a finished step leaves."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def queue(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_queue", ROOT / "scripts" / "gpu_queue.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_queue", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def fake_steps(q, ran):
    def cmd(name, seconds_needed):
        def build(d, budget):
            ran.append((name, round(budget)))
            if budget < seconds_needed:  # as a real step: it stops at its limit, unfinished
                return [sys.executable, "-c", "pass"]
            return [sys.executable, "-c", f"open({str(d / 'done')!r}, 'w').write('x')"]
        return build

    def progress(d):
        return (d / "done").exists(), ("finished" if (d / "done").exists() else "not started")

    return tuple(q.Step(n, n, cmd(n, need), progress, min_s=mn) for n, need, mn in
                 (("a", 0, 1), ("b", 0, 1), ("c", 10_000, 1), ("d", 0, 1)))


def test_runs_steps_in_order_and_stops_inside_an_unfinished_one(queue, tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(queue, "STEPS", fake_steps(queue, ran))
    assert queue.main(["--root", str(tmp_path), "--time-limit", "120"]) == 0
    assert [n for n, _ in ran] == ["a", "b", "c"]  # c runs out of time: d waits for the next call
    out = capsys.readouterr().out
    assert "| c | not started |" in out and "left: c, d" in out
    ran.clear()
    monkeypatch.setattr(queue, "STEPS", fake_steps(queue, ran))
    queue.main(["--root", str(tmp_path), "--time-limit", "120"])
    assert [n for n, _ in ran] == ["c"]  # a and b are done; c again
    assert (tmp_path / "queue-status.md").read_text().count("| done |") == 2


def test_a_step_that_needs_more_time_than_is_left_is_not_started(queue, tmp_path, monkeypatch, capsys):
    ran = []
    steps = fake_steps(queue, ran)
    monkeypatch.setattr(queue, "STEPS", (queue.Step("big", "big", steps[0].command, steps[0].progress, min_s=600),))
    queue.main(["--root", str(tmp_path), "--time-limit", "120"])
    assert ran == [] and "needs at least 600 s" in capsys.readouterr().out


def test_status_runs_nothing_and_reads_committed_runs(queue, tmp_path, capsys):
    fit = tmp_path / "fit"
    fit.mkdir()
    (fit / "fit.json").write_text((ROOT / "reports/reference/h200-fit-claims-2026-11-29/fit.json").read_text())
    assert queue.main(["--root", str(tmp_path), "--status"]) == 0
    out = capsys.readouterr().out
    assert "| fit | partial | 9 of 16 answers measured |" in out
    assert "| overhead | not started |" in out and "| reference | not started |" in out


def test_an_unknown_step_is_one_line_and_exit_2(queue, tmp_path, capsys):
    assert queue.main(["--root", str(tmp_path), "--only", "nope"]) == 2
    assert capsys.readouterr().err.startswith("gpu-queue: error: unknown step 'nope'")


def test_the_stacks_step_runs_the_cells_then_the_fit_and_counts_both(queue, tmp_path):
    d = tmp_path / "stacks"
    assert queue._stacks_progress(d) == (False, "not started")
    script = queue._stacks_cmd(d, 500)[2]
    cells, fit = script.index("suites/test_matrix.py"), script.index("suites/test_fit.py")
    assert cells < fit and "--stack hf,liger,unsloth" in script and "--budgets 24,40" in script
    assert "--precision bf16,nf4-dq --seq-len 2048,8192 --grad-ckpt on" in script
    recs = [{"cell_id": c, "status": "ok"} for c in sorted(queue._expected_cells([queue.STACK_CELLS]))]
    assert len(recs) == 12 and recs[-1]["cell_id"] == "llama-3.1-8b/nf4-dq/s8192/gc-on/stack-unsloth"
    (d / "cells").mkdir(parents=True)
    (d / "cells" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:5]))
    assert queue._stacks_progress(d) == (False, "5 of 12 cells measured, 0 of 12 fit answers measured")
    no_wheels = [dict(r, status="unsupported") for r in recs[5:]]
    (d / "cells" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:5] + no_wheels))
    assert queue._stacks_progress(d)[1].startswith("5 of 12 cells measured (7 unsupported: were the stacks' wheels")
    (d / "cells" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "fit").mkdir()
    answers = [{"budget_bytes": b, "status": "found", "longest": 4096} for b in (24, 40)]
    (d / "fit" / "fit.json").write_text(json.dumps({"rows": [{"answers": answers}] * 6}))
    assert queue._stacks_progress(d) == (True, "12 of 12 cells measured, 12 of 12 fit answers measured")


def test_a_step_past_its_limit_is_stopped_with_everything_it_started(queue, tmp_path, monkeypatch, capsys):
    """A hung cell inside pytest inside a shell: stopping the shell alone would leave the cell
    holding the GPU while the host tars its results."""
    import os
    import time

    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    step = queue.Step("hang", "hang", lambda d, budget: ["bash", "-c", script], lambda d: (False, "not started"), min_s=1)
    monkeypatch.setattr(queue, "OVERRUN_S", 0)
    started = time.monotonic()
    assert queue.run_step(step, tmp_path, 1.0) == 124
    assert time.monotonic() - started < 15 and "stopped at its limit" in capsys.readouterr().out
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # killed; only its parent's reaper is left to run
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the step's grandchild outlived the step")


def test_the_stacks_step_bounds_each_cell(queue, tmp_path):
    argv = queue._stacks_cmd(tmp_path, 300)
    assert f"--cell-timeout {queue.STACK_CELL_TIMEOUT_S}" in argv[-1]


def _interleaved(tmp_path, cells):
    d = tmp_path / "overhead"
    d.mkdir(exist_ok=True)
    (d / "interleaved.json").write_text(json.dumps({"settings": {"rounds": 200}, "cells": cells}))
    return d


def _cell(name, rounds=85, sides="ok", **verdicts):
    comps = {k: {"verdict": v, "rounds_to_decide": n} for k, (v, n) in verdicts.items()}
    return {"cell": name, "rounds": rounds, "comparisons": comps,
            "sides": {s: {"status": sides if s == "harness" else "ok"} for s in ("bare", "harness")}}


def test_the_overhead_step_ends_when_every_cell_is_settled_not_at_200_rounds(queue, tmp_path):
    """The driver starts over on each call and about 85 rounds fit in one: a cell whose
    comparisons are decided, or cannot be decided within the plan, needs no further call."""
    names = queue.OVERHEAD_CELLS.split(",")
    decided = _cell(names[1], harness_vs_bare=("met", 37), sampler_cost=("cannot tell", 5480))
    oom = _cell(names[0], rounds=0, sides="oom", harness_vs_bare=("cannot tell", None))
    near = _cell(names[2], harness_vs_bare=("met", 40), sampler_cost=("cannot tell", 150))
    done, how = queue._overhead_progress(_interleaved(tmp_path, [oom, decided, near]))
    assert not done and how.startswith("2 of 3 cells settled") and f"{names[0]}: a side ran out of memory" in how
    near["comparisons"]["sampler_cost"]["verdict"] = "missed"
    done, how = queue._overhead_progress(_interleaved(tmp_path, [oom, decided, near]))
    assert done and how.startswith("3 of 3 cells settled")
    done, how = queue._overhead_progress(_interleaved(tmp_path, [decided, near]))  # a cell never reached
    assert not done and how.startswith("2 of 3")
    stopped = _cell(names[0], rounds=0, sides="error", harness_vs_bare=("cannot tell", None))
    assert not queue._overhead_progress(_interleaved(tmp_path, [stopped, decided, near]))[0]


def test_the_committed_h100_overhead_run_counts_as_settled(queue):
    done, how = queue._overhead_progress(ROOT / "reports" / "reference" / "h100-overhead-2026-12-05")
    assert done and "ran out of memory" in how
