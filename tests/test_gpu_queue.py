"""The GPU work queue (scripts/gpu_queue.py): order, time limits, resuming, the status
table. The steps' own commands run on a GPU host; here they are replaced by small
commands that leave the files a finished step leaves."""

import importlib.util
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
