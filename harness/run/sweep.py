"""A sweep: cells decided, launched and recorded into one run folder, each record appended
the moment its cell ends. The pytest plugin and the CLI are thin skins over it (both open
it with ``harness.run.open_sweep``). Imports no torch.

A cell goes through three steps, each a method, so that any executor can drive them:

1. ``decide``: replay its stored record (``--resume``), leave it for later
   (``--time-limit``: not run, not recorded), record it unsupported without starting it
   (the capability rules), record it pruned (a shorter cell of its row ran out of
   memory), or launch it. -> ``Decision``
2. ``launch``: run it through a launcher (``harness.run.launch``): torchrun when its
   ``world_size`` is above 1, else the fork launcher of the lane it was given.
   -> ``Launched``
3. ``record``: the record (``make_record``, the sweep's extras, the lane's placement),
   appended to results.jsonl; the progress line (``harness.run.progress``).

How cells are spread over lanes, and in what order, is the executor's
(``harness.run.executors``): one after another through one fork server, or over GPUs
(``harness.run.pool``). The sweep is the only writer of the run folder.
"""

from __future__ import annotations

import enum
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from harness.core.phases import process_started_at
from harness.core.record import Status, make_record
from harness.core.spec import CellSpec
from harness.core import fingerprint as fp
from harness.core import steps
from harness.core.store import RunLock, RunStore, StoreError
from harness.plan import capability
from harness.plan.options import SweepConfig
from harness.plan.prune import pruned_by, pruned_record
from harness.run.executors import Executor, Job, SerialExecutor
from harness.run.forkserver import classify
from harness.run.launch import Launched, Lane, Launcher
from harness.run.progress import Progress


class Verdict(str, enum.Enum):
    RESUMED = "resumed"  # recorded by an earlier invocation: replayed
    OUT_OF_TIME = "out_of_time"  # --time-limit reached: not started, not recorded
    UNSUPPORTED = "unsupported"  # the capability rules say it cannot run here: recorded, not started
    PRUNED = "pruned"  # a shorter cell of its row ran out of memory: recorded as oom, not started
    LAUNCH = "launch"


@dataclass
class Decision:
    """What ``Sweep.decide`` made of a cell."""

    cell: CellSpec
    verdict: Verdict
    suite: str | None = None  # the suite the record belongs to (compat, stability)
    prediction: capability.Prediction | None = None
    worker: dict[str, Any] | None = None  # UNSUPPORTED / PRUNED: the worker half, no process started
    record: dict[str, Any] | None = None  # RESUMED: the stored record
    at: float = field(default_factory=time.monotonic)  # the cell's own time counts from here


class Sweep:
    def __init__(self, config: SweepConfig, facts: dict[str, Any], *, command: str = "",
                 out: Callable[[str], None] | None = None, total: int | None = None,
                 executor: Executor | None = None) -> None:
        self.config = config
        self.facts = dict(facts, device_pref=config.device, use_gpu=bool(facts.get("has_gpu")) and config.device != "cpu")
        self.command = command or " ".join(sys.argv)
        self.out = out or (lambda s: print(s, flush=True))
        self.executor: Executor = executor or SerialExecutor()
        self.progress = Progress(self.out, total if total is not None else len(config.cells))
        self.store: RunStore | None = None
        self.env: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.done: dict[str, dict[str, Any]] = {}  # cell id -> the record --resume replays for it
        self.stored: dict[str, list[dict[str, Any]]] = {}  # cell id -> every record the folder held at the start
        self.rerun: dict[str, str] = {}  # cell id -> why its stored record does not stand for it now
        self.lock: RunLock | None = None
        self.started_at = process_started_at()  # what --time-limit counts from
        self.not_started: list[str] = []  # cells --time-limit kept from starting
        self.stopping = threading.Event()  # set when interrupted: nothing more is recorded (--resume reruns it)
        self._prerun: dict[str, dict[str, Any]] = {}  # cell id -> record of a pass run ahead (prerun)
        self._lock = threading.RLock()
        self._torchrun: Launcher | None = None

    @property
    def total(self) -> int:
        """Cells this sweep expects (the progress line's denominator); <= 0: not known."""
        return self.progress.total

    @total.setter
    def total(self, value: int) -> None:
        self.progress.total = value

    @property
    def lane(self) -> Lane | None:
        """The main lane: the host's fingerprint, the loading checks, single cells (``run``)."""
        return self.executor.main

    @property
    def launcher(self) -> Launcher | None:
        """The main lane's launcher, for jobs that are not cells; None until started."""
        return self.lane.launcher if self.lane is not None else None

    # -- lifecycle -----------------------------------------------------------------
    def open_store(self) -> RunStore:
        """Create / reopen the run folder and take its lock for the sweep's life (cheap; no
        worker started). Resuming, a stored record stands for a cell only when its settings
        fingerprint is the cell's; without --resume, a folder that already holds some of
        this sweep's cells measured with other settings is refused (the same settings make
        the new records repeats)."""
        if self.store is None:
            store = RunStore.open(self.config.run_dir, resume=self.config.resume)
            self.lock = RunLock(store.dir).acquire(self.command)
            self.store = store
            for rec in store.records():
                if rec.get("cell_id"):
                    self.stored.setdefault(rec["cell_id"], []).append(rec)
            if not self.config.resume:
                self._refuse_other_settings()
        return self.store

    def fingerprint(self, cell: CellSpec) -> str:
        return fp.fingerprint(cell, self.config.worker_opts())

    def resumable(self, cell: CellSpec) -> dict[str, Any] | None:
        """The stored record --resume replays for ``cell``: its latest with the same
        settings. A cell whose stored records were made with other settings runs again
        (``rerun`` says why)."""
        if cell.cell_id in self.done:
            return self.done[cell.cell_id]
        if not self.config.resume or cell.cell_id not in self.stored:
            return None
        want = self.fingerprint(cell)
        same = [r for r in self.stored[cell.cell_id] if fp.of_record(r) == want]
        if same:
            self.done[cell.cell_id] = same[-1]
            return same[-1]
        if cell.cell_id not in self.rerun:
            self.rerun[cell.cell_id] = fp.explain(self.stored[cell.cell_id][-1], cell, self.config.worker_opts())
            self.out(f"lora-harness: {cell.cell_id}: runs again, its stored record was made with other settings "
                     f"({self.rerun[cell.cell_id]})")
        return None

    def _refuse_other_settings(self) -> None:
        for cell in self.config.cells:
            recs = self.stored.get(cell.cell_id)
            if recs and all(fp.of_record(r) != self.fingerprint(cell) for r in recs):
                self.close()
                raise StoreError(f"{self.store.dir} already holds {cell.cell_id} measured with other settings "
                                 f"({fp.explain(recs[-1], cell, self.config.worker_opts())}): continue it with the "
                                 "same settings and --resume, or give another --run-dir")

    def repeat_of(self, cell: CellSpec) -> int:
        """How many records of ``cell`` with the same settings the folder held before: the
        new record is repeat number that + 1 (0: a first measurement)."""
        want = self.fingerprint(cell)
        return sum(1 for r in self.stored.get(cell.cell_id, ()) if fp.of_record(r) == want)

    def start(self) -> None:
        """Start the executor's launchers (once); the run folder gets env.json and run.json."""
        if self.executor.main is None:
            self.open_store()
            self.executor.start(self)

    def open_run(self, lane: Lane) -> None:
        """Called by the executor with its main lane: start it, write env.json (this host's
        fingerprint, collected through it) and add this invocation to run.json."""
        store = self.open_store()
        t0 = time.monotonic()
        ready = lane.launcher.start()
        server_s = time.monotonic() - t0  # the sweep's fixed cost (env.json)
        self.out(f"lora-harness: worker server ready in {server_s:.1f} s "
                 f"(libraries imported once in {ready.get('preload_s', 0):.1f} s; cells start by {ready.get('mode')})")
        for err in ready.get("preload_errors") or []:
            self.out(f"lora-harness: warning: could not preload {err}")
        env_out = lane.launcher.run_job("harness.cell.env:collect", {}, timeout_s=300,
                                        log_path=store.dir / "logs" / "env.log")
        self.env = env_out.result or {"error": classify(env_out, 300).get("error")}
        self.env["worker_mode"] = ready.get("mode")
        self.env["worker_mode_reason"] = ready.get("why")
        self.env["worker_preload_s"] = ready.get("preload_s")
        self.env["worker_start_s"] = server_s  # server start, preload included
        self.env["env_collect_s"] = env_out.wall_s
        store.write_json("env.json", self.env)
        meta = store.read_json("run.json") or {}
        invocations = meta.get("invocations", [])
        invocations.append({"command": self.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "options": self.config.options, "matrix": self.config.matrix,
                            "cells": len(self.config.cells)})
        shard = {"shard": self.config.shard.to_json()} if self.config.shard else {}  # for `lora-harness shards`
        store.write_json("run.json", {"run_id": store.run_id, "invocations": invocations, **shard})
        self.out(f"lora-harness: run folder {store.dir}")

    def close(self) -> None:
        self.executor.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "Sweep":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the three steps of a cell -------------------------------------------------
    def decide(self, cell: CellSpec, *, suite: str | None = None, attempt_unsupported: bool = False,
               check_time: bool = False) -> Decision:
        """What to do with ``cell``. ``attempt_unsupported`` (the compatibility suite) runs a
        cell the capability rules predict unsupported, and its record holds both the
        prediction and what really happened. ``check_time``: a cell past --time-limit is
        not started (callers that check the limit themselves leave it off)."""
        self.open_store()
        stored = self.resumable(cell)
        if stored is not None:
            return Decision(cell, Verdict.RESUMED, suite, record=dict(stored, resumed=True))
        if check_time and self.out_of_time(cell):
            return Decision(cell, Verdict.OUT_OF_TIME, suite)
        self.start()  # every run folder gets env.json, even if no cell can run here
        prediction = capability.verdict(cell, self.facts)
        cause = pruned_by(cell, self.records) if self.config.prune else None
        if prediction.reason and not attempt_unsupported:
            worker = {"status": Status.UNSUPPORTED.value, "error": prediction.reason, "predicted_unsupported": True}
            return Decision(cell, Verdict.UNSUPPORTED, suite, prediction, worker=worker)
        if cause:
            return Decision(cell, Verdict.PRUNED, suite, prediction, worker=pruned_record(cell, cause))
        return Decision(cell, Verdict.LAUNCH, suite, prediction)

    def launch(self, cell: CellSpec, launcher: Launcher) -> Launched:
        """Run ``cell``: under torchrun when it spans several GPUs, else through ``launcher``."""
        store = self.open_store()
        if cell.world_size > 1:
            launcher = self._torchrun_launcher()
        return launcher.launch(cell, self.config.worker_opts(), timeout_s=self.config.cell_timeout_s,
                               log_path=store.log_path(cell.cell_id))

    def record(self, decision: Decision, launched: Launched | None = None, *, lane: Lane | None = None) -> dict[str, Any]:
        """The cell's record, appended to results.jsonl and reported: from ``launched``
        for a cell that ran (on ``lane``), from ``decision`` for one that did not."""
        if decision.verdict is Verdict.RESUMED:
            return self.commit(decision.record, resumed=True)
        cell, store, env = decision.cell, self.open_store(), self.env or {}
        if launched is None:
            worker, extra = decision.worker or {}, {"wall_time_s": 0.0}
        else:
            worker = launched.worker
            extra = {"wall_time_s": launched.wall_time_s, "log": os.path.relpath(launched.log, store.dir),
                     "exit_code": launched.exit_code, "exit_signal": launched.exit_signal}
        if cell.world_size > 1:  # against this run's one-GPU cell
            from harness.run.torchrun import scaling_fields

            extra.update(scaling_fields(cell, worker, list(self.done.values()) + self.records))
        extra["prediction"] = decision.prediction.to_dict() if decision.prediction is not None else None
        extra.update(steps.quality(worker))
        extra["fingerprint"] = self.fingerprint(cell)
        extra["measurement_opts"] = fp.measurement_opts(self.config.worker_opts())
        repeat = self.repeat_of(cell)
        if repeat:
            extra["repeat"] = repeat
        if decision.suite:
            extra["suite"] = decision.suite
        extra.update({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hostname": env.get("hostname"),
                      "gpu_name": worker.get("device_name") if worker.get("device") == "cuda" else env.get("gpu_name"),
                      "worker_mode": env.get("worker_mode")})
        if lane is not None:
            extra.update(lane.placement(worker))
        rec = make_record(cell.to_dict(), cell.cell_id, store.run_id, worker, extra)
        return self.commit(rec, lane=lane, elapsed=time.monotonic() - decision.at)

    def commit(self, rec: dict[str, Any], *, lane: Lane | None = None, elapsed: float | None = None,
               resumed: bool = False) -> dict[str, Any]:
        """Append ``rec`` (a replayed one is not stored again) and report it. Once the
        sweep is stopping nothing is recorded: a cell killed by the interruption is not
        a result, and --resume runs it again."""
        with self._lock:
            if self.stopping.is_set():
                return rec
            if not resumed:
                self.open_store().append(rec)
            self.records.append(rec)
            self.progress.cell(rec, resumed=resumed, elapsed=elapsed, where=lane.label if lane else None,
                               lanes=self.executor.live)
        return rec

    def _torchrun_launcher(self) -> Launcher:
        if self._torchrun is None:
            from harness.run.torchrun import TorchrunLauncher

            self._torchrun = TorchrunLauncher(self.open_store().dir / "logs")
        return self._torchrun

    # -- cells ---------------------------------------------------------------------
    def step(self, cell: CellSpec, *, suite: str | None = None, attempt_unsupported: bool = False,
             lane: Lane | None = None, check_time: bool = False) -> dict[str, Any] | None:
        """decide -> launch -> record for one cell on ``lane`` (the main lane by default);
        None for a cell --time-limit kept from starting."""
        d = self.decide(cell, suite=suite, attempt_unsupported=attempt_unsupported, check_time=check_time)
        if d.verdict is Verdict.OUT_OF_TIME:
            return None
        if d.verdict is Verdict.RESUMED:
            return self.record(d)
        lane = lane or self.lane
        launched = self.launch(cell, lane.launcher) if d.verdict is Verdict.LAUNCH else None
        return self.record(d, launched, lane=lane)

    def run(self, cell: CellSpec, *, suite: str | None = None, attempt_unsupported: bool = False) -> dict[str, Any]:
        """Run one cell now on the main lane (or replay its record) and record it; a cell
        run ahead by ``prerun`` returns that record. ``suite`` names the suite the record
        belongs to; ``attempt_unsupported``: see ``decide``."""
        rec = self._prerun.get(cell.cell_id)
        if rec is not None:
            return rec
        rec = self.step(cell, suite=suite, attempt_unsupported=attempt_unsupported)
        assert rec is not None  # without check_time every cell is recorded
        return rec

    def run_jobs(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Run ``(cell, suite, attempt_unsupported)`` jobs through the executor; the records
        in job order, without the cells --time-limit kept from starting (``not_started``)."""
        return self.executor.run_jobs(self, jobs)

    def run_all(self, cells=None) -> list[dict[str, Any]]:
        self.run_jobs([(c, None, False) for c in (cells if cells is not None else self.config.cells)])
        return self.records

    def prerun(self, jobs: Sequence[Job]) -> dict[str, dict[str, Any]]:
        """Run ``jobs`` now; later ``run`` calls for them return their records. Returns the
        records by cell id."""
        recs = {r["cell_id"]: r for r in self.run_jobs(jobs)}
        self._prerun.update(recs)
        return recs

    def out_of_time(self, cell: CellSpec) -> bool:
        """--time-limit: whether ``cell`` must not start (a recorded cell replays anyway).
        Such a cell is not run and not recorded; ``--resume`` runs it later."""
        if self.resumable(cell) is not None or not self.config.out_of_time(self.started_at):
            return False
        with self._lock:
            if not self.not_started:
                self.out(f"lora-harness: --time-limit {self.config.time_limit_s:g} s reached: no new cell starts; "
                         "rerun with --resume to continue")
            self.not_started.append(cell.cell_id)
        return True
