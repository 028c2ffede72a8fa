"""The sweep's steps, launchers, executors, the progress line and the cell's tracker stack,
without a worker process: fake launchers answer for the cells."""

import concurrent.futures
import dataclasses

import pytest

from harness.cell.trackers import Trackers
from harness.core.phases import TIMELINE, PhaseClock
from harness.plan.options import build_config
from harness.run.forkserver import JobOutcome
from harness.run.launch import ForkLauncher, Launched, Lane
from harness.run.pool import ready_index
from harness.run.progress import Progress
from harness.run.sweep import Sweep, Verdict

CPU = {"has_gpu": False}


# -- the cell's trackers ---------------------------------------------------------------

class _Tracker:
    def __init__(self, name, events, fail_start=False):
        self.name, self.events, self.fail_start = name, events, fail_start

    def __enter__(self):
        self.events.append(f"start {self.name}")
        if self.fail_start:
            raise RuntimeError(f"{self.name} could not start")
        return self

    def __exit__(self, *exc):
        self.events.append(f"stop {self.name}")

    def finish(self, out):
        self.events.append(f"finish {self.name}")
        out[self.name] = out.get("seen", []) + [self.name]
        out["seen"] = out[self.name]


def test_trackers_stop_the_clock_first_and_report_in_the_order_added():
    events, out = [], {}
    clock = PhaseClock("imports")
    with pytest.raises(MemoryError):
        with Trackers(out, clock) as trackers:
            trackers.add(_Tracker("sampler", events))
            trackers.add(_Tracker("guard", events))
            raise MemoryError("out of memory")
    assert events == ["start sampler", "start guard", "stop guard", "stop sampler", "finish sampler", "finish guard"]
    assert out["guard"] == ["sampler", "guard"]  # the guard saw the sampler's figures
    assert out[TIMELINE]["body_end"] == clock.end and out[TIMELINE]["cell_start"] == clock.start
    assert "phase_imports_s" in out


def test_a_tracker_whose_start_failed_still_reports():
    events, out = [], {}
    with pytest.raises(RuntimeError, match="guard could not start"):
        with Trackers(out) as trackers:
            trackers.add(_Tracker("sampler", events))
            trackers.add(_Tracker("guard", events, fail_start=True))
    assert events == ["start sampler", "start guard", "stop sampler", "finish sampler", "finish guard"]


# -- launchers -------------------------------------------------------------------------

class _Runner:
    """Stands in for ForkServerRunner: a cell's result with the worker's clock readings."""

    def run_job(self, target, args, *, timeout_s, log_path):
        result = {"status": "ok", "phase_measured_s": 1.0, "phase_warmup_s": 0.5,
                  TIMELINE: {"child_start": 10.25, "cell_start": 10.5, "body_end": 12.0}}
        return JobOutcome("j1", result, 0, None, False, 2.5, str(log_path), t_submit=10.0, t_exit=12.5)


def test_the_fork_launcher_turns_the_timeline_into_phases_and_drops_it(tmp_path):
    launcher = ForkLauncher(tmp_path)
    launcher.runner = _Runner()
    cell = build_config({"lh_precision": "bf16", "lh_seq_len": "32"}, CPU).cells[0]
    got = launcher.launch(cell, {}, timeout_s=60, log_path=tmp_path / "c.log")
    assert (got.wall_time_s, got.exit_code, got.exit_signal, got.log) == (2.5, 0, None, str(tmp_path / "c.log"))
    assert TIMELINE not in got.worker and not any(k.startswith("_") for k in got.worker)
    assert got.worker["phase_spawn_s"] == 0.25 and got.worker["phase_teardown_s"] == 0.5
    assert got.worker["fixed_cost_s"] == 1.0


def test_the_torchrun_launcher_drops_the_ranks_timelines(tmp_path, monkeypatch):
    from harness.run import torchrun

    cell = build_config({"lh_precision": "bf16", "lh_seq_len": "32", "lh_world_size": "2"}, CPU).cells[-1]
    assert cell.world_size == 2
    ranks = {r: {"status": "error", "error": "ValueError: bug", TIMELINE: {"cell_start": 1.0}, "rank_facts": {}}
             for r in (0, 1)}
    monkeypatch.setattr(torchrun, "launch", lambda *a, **k: torchrun.DistOutcome(ranks, 3, None, False, 4.0,
                                                                                   str(tmp_path / "c.log"), []))
    got = torchrun.TorchrunLauncher(tmp_path).launch(cell, {}, timeout_s=60, log_path=tmp_path / "c.log")
    assert got.worker["status"] == "error" and TIMELINE not in got.worker and got.exit_code == 3


# -- the sweep's steps -----------------------------------------------------------------

class _FakeLauncher:
    """Cells run out of memory from 128 tokens on; a lock-free record of what ran where."""

    def __init__(self, name, ran):
        self.name, self.ran = name, ran

    def start(self):
        return {"mode": "fake"}

    def launch(self, cell, opts, *, timeout_s, log_path):
        self.ran.append((self.name, cell.cell_id))
        status = "oom" if cell.seq_len >= 128 else "ok"
        return Launched({"status": status, "tokens_per_s": 100.0 if status == "ok" else None}, 0.5, str(log_path), 0)

    def run_job(self, target, args, *, timeout_s, log_path):
        return JobOutcome("env", {"hostname": "fake-host"}, 0, None, False, 0.1, str(log_path))

    def close(self):
        pass


class _TwoLanes:
    """An executor shaped like a remote one (a Ray executor's): the sweep decides on the
    caller's thread, launches go to workers, the caller records what comes back."""

    live = 2

    def __init__(self, ran):
        self.ran = ran
        self.main = None
        self.lanes = []

    def start(self, sweep):
        self.lanes = [Lane(_FakeLauncher(f"node{i}", self.ran), label=f"node{i}",
                           placement=lambda w, i=i: {"node": i}) for i in range(2)]
        self.main = self.lanes[0]
        sweep.open_run(self.main)

    def run_jobs(self, sweep, jobs):
        pending, busy, records = [j for j in jobs], [], {}
        free = list(self.lanes)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = {}
            while pending or running:
                i = ready_index([j[0] for j in pending], busy, prune=sweep.config.prune) if free else None
                if i is not None:
                    cell, suite, attempt = pending.pop(i)
                    d = sweep.decide(cell, suite=suite, attempt_unsupported=attempt, check_time=True)
                    if d.verdict is Verdict.LAUNCH:
                        lane = free.pop()
                        busy.append(cell)
                        running[pool.submit(lambda c=cell, ln=lane: dataclasses.asdict(sweep.launch(c, ln.launcher)))] = (d, lane)
                    elif d.verdict is not Verdict.OUT_OF_TIME:
                        records[cell.cell_id] = sweep.record(d)
                    continue
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for f in done:
                    d, lane = running.pop(f)
                    records[d.cell.cell_id] = sweep.record(d, Launched(**f.result()), lane=lane)
                    busy.remove(d.cell)
                    free.append(lane)
        return [records[j[0].cell_id] for j in jobs if j[0].cell_id in records]

    def close(self):
        self.main = None


def test_an_executor_drives_decide_launch_record(tmp_path):
    ran, lines = [], []
    cfg = build_config({"lh_precision": "bf16,fp32", "lh_seq_len": "64,128,256", "lh_grad_ckpt": "off",
                        "lh_run_dir": str(tmp_path / "run")}, CPU)
    with Sweep(cfg, CPU, out=lines.append, executor=_TwoLanes(ran)) as sweep:
        recs = sweep.run_jobs([(c, None, False) for c in cfg.cells])
    by = {(r["precision"], r["seq_len"]): r for r in recs}
    assert [r["cell_id"] for r in recs] == [c.cell_id for c in cfg.cells]
    for p in ("bf16", "fp32"):
        assert by[p, 64]["status"] == "ok" and by[p, 128]["status"] == "oom" and by[p, 128]["log"]
        assert by[p, 256]["pruned"] is True and by[p, 256]["wall_time_s"] == 0.0 and "node" not in by[p, 256]
        assert by[p, 64]["node"] in (0, 1) and by[p, 64]["hostname"] == "fake-host"
    assert sorted(c for _, c in ran) == sorted(c.cell_id for c in cfg.cells if c.seq_len < 256)
    assert len([ln for ln in lines if ln.startswith("[")]) == 6 and any("] node" in ln for ln in lines)


def test_decide_replays_predicts_and_keeps_out_of_time_cells_unrecorded(tmp_path):
    cfg = build_config({"lh_precision": "bf16,nf4", "lh_seq_len": "32,64", "lh_grad_ckpt": "off",
                        "lh_run_dir": str(tmp_path / "run"), "lh_time_limit": 5.0}, CPU)
    sweep = Sweep(cfg, dict(CPU, bitsandbytes_installed=False), out=lambda s: None, executor=_TwoLanes([]))
    first, second = cfg.cells[0], cfg.cells[1]
    sweep.done = {first.cell_id: {"cell_id": first.cell_id, "status": "ok"}}
    assert sweep.decide(first).verdict is Verdict.RESUMED
    nf4 = next(c for c in cfg.cells if c.precision == "nf4")
    d = sweep.decide(nf4)
    assert d.verdict is Verdict.UNSUPPORTED and d.worker["predicted_unsupported"]
    assert sweep.decide(nf4, attempt_unsupported=True).verdict is Verdict.LAUNCH
    sweep.started_at -= 10
    assert sweep.decide(second, check_time=True).verdict is Verdict.OUT_OF_TIME
    assert sweep.not_started == [second.cell_id] and sweep.decide(second).verdict is Verdict.LAUNCH
    sweep.close()


def test_nothing_is_recorded_once_the_sweep_stops(tmp_path):
    cfg = build_config({"lh_precision": "bf16", "lh_seq_len": "32", "lh_grad_ckpt": "off",
                        "lh_run_dir": str(tmp_path / "run")}, CPU)
    with Sweep(cfg, CPU, out=lambda s: None, executor=_TwoLanes([])) as sweep:
        sweep.stopping.set()
        sweep.run(cfg.cells[0])
        results = tmp_path / "run" / "results.jsonl"
        assert sweep.records == [] and (not results.exists() or not results.read_text().strip())


# -- the progress line -----------------------------------------------------------------

def test_the_progress_line_names_the_lane_of_a_cell_that_ran():
    lines = []
    p = Progress(lines.append, 4)
    ok = {"cell_id": "m/bf16/s64/gc-off", "status": "ok", "tokens_per_s": 1000.0, "log": "x.log",
          "wall_time_s": 10.0, "peak_rss_bytes": 2 ** 30}
    p.cell(ok, elapsed=10.0, where="gpu1", lanes=2)
    p.cell(dict(ok, cell_id="m/bf16/s128/gc-off", status="oom", log=None, pruned=True), elapsed=0.0, where="gpu0",
           lanes=2)
    p.cell(dict(ok, cell_id="m/bf16/s32/gc-off", gpu_pin_mismatch=True, gpu_index=3), elapsed=1.0, where="gpu1")
    p.cell(dict(ok, cell_id="m/fp32/s64/gc-off"), resumed=True, where="gpu0")
    assert lines[0].startswith("[1/4] gpu1 m/bf16/s64/gc-off: ok") and "ETA 15s" in lines[0]  # 10 s x 3 left / 2 lanes
    assert lines[1].startswith("[2/4] m/bf16/s128/gc-off: OOM")  # never ran: no lane
    assert "warning: pinned to gpu1 but NVML read GPU 3" in lines[2]
    assert lines[3].startswith("[4/4] m/fp32/s64/gc-off") and "(resumed;" in lines[3]
    unknown = Progress(lines.append, 0)
    unknown.cell(ok, elapsed=1.0)
    assert lines[-1].startswith("[1] m/bf16/s64/gc-off") and "ETA -" in lines[-1]


def test_the_serial_executor_starts_nothing_for_replayed_cells(tmp_path):
    cfg = build_config({"lh_precision": "bf16", "lh_seq_len": "32", "lh_grad_ckpt": "off",
                        "lh_run_dir": str(tmp_path / "run")}, CPU)
    sweep = Sweep(cfg, CPU, out=lambda s: None)
    sweep.done = {cfg.cells[0].cell_id: {"cell_id": cfg.cells[0].cell_id, "status": "ok"}}
    assert [r["resumed"] for r in sweep.run_all()] == [True] and sweep.launcher is None
