"""Cells in parallel across GPUs (``--gpus``): the ``GpuPool`` executor. Imports no torch.

One worker server per GPU, started with that GPU pinned (``harness.plan.gpus.GpuSlot.pin_env``:
``CUDA_VISIBLE_DEVICES=<its UUID>``), so every cell it forks sees one device and its NVML
sampler reads that device: memory and energy figures of one cell never include another
cell's. Each GPU is a lane (``harness.run.launch.Lane``) with a thread in the parent that
takes cells from one queue and puts each through the sweep's own steps (decide, launch on
its lane, record: capability rules, pruning, records, progress): the parent is the only
writer of ``results.jsonl`` and never imports torch.

Order and pruning. A cell is handed out only when no shorter cell of its row (same
model, precision, checkpointing mode, batch and settings; ``harness.plan.prune.row_key``) is
still queued or running: a row's cells therefore run in ascending length, whichever GPUs
they land on, and a cell that must run out of memory because a shorter one did is
recorded as pruned without being started, exactly as in a serial sweep. Other rows fill
the GPUs meanwhile.

Failures stay on their GPU. A cell that crashes, times out or errs is a record like any
other and its GPU takes the next cell; a worker server that cannot be (re)started takes
its GPU out of the pool (its cell is recorded as ``crash``) and the other GPUs take the
remaining cells. An interrupted sweep (Ctrl-C) kills the cells in flight and records none
of them, so ``--resume`` runs them again.

The pytest plugin uses the same pool: with ``--gpus`` it runs the session's selected
cells through it before the first test (``Sweep.prerun``), and each test then reports its
cell's record (see ``harness.pytest_plugin.pytest_runtestloop`` and docs/decisions.md for why not
pytest-xdist). A cell run outside a pooled pass goes to the first GPU of the list.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from typing import Any, Sequence

from harness.core.record import Status, make_record
from harness.core.spec import CellSpec
from harness.core.fmt import fmt_duration
from harness.plan.gpus import GpuSlot
from harness.plan.prune import row_key
from harness.run.executors import Job, Steps, first_of_each_cell
from harness.run.forkserver import RunnerError
from harness.run.launch import ForkLauncher, Lane


def ready_index(pending: Sequence[CellSpec], busy: Sequence[CellSpec], *, prune: bool,
                keys: dict[str, Any] | None = None) -> int | None:
    """Index of the first pending cell that may start now, or None (wait for a running
    one). With pruning, a cell waits while a shorter cell of its row is pending or
    running, so its fate (pruned or run) is decided as in a serial sweep. Pure."""
    if not pending:
        return None
    if not prune:
        return 0
    keys = keys if keys is not None else {}

    def key(c: CellSpec):
        if c.cell_id not in keys:
            keys[c.cell_id] = row_key(c)
        return keys[c.cell_id]

    for i, cell in enumerate(pending):
        k = key(cell)
        if not any(o.seq_len < cell.seq_len and key(o) == k for o in (*pending, *busy) if o is not cell):
            return i
    return None


def pin_fields(worker: dict[str, Any], *, slot: GpuSlot, pool: list[int]) -> dict[str, Any]:
    """The GPU a cell was pinned to, in its record (a lane's ``placement``). The worker's
    own NVML reading (``gpu_index`` / ``gpu_uuid``, the device its sampler read) wins; a
    cell that died before saying is given its slot's; a disagreement is flagged."""
    fields: dict[str, Any] = {"gpu_pool": list(pool)}
    if worker.get("pruned") or worker.get("predicted_unsupported"):
        return fields  # never started: it ran on no GPU
    measured = worker.get("gpu_index")
    fields["gpu_index"] = measured if measured is not None else slot.index
    fields["gpu_uuid"] = worker.get("gpu_uuid") or slot.uuid
    if measured is not None and measured != slot.index:
        fields["gpu_pin_mismatch"] = True
    if worker.get("device") != "cuda" and not slot.fake:
        fields["gpu_name"] = slot.name  # crash / timeout before the worker named its device
    return fields


class _Queue:
    """The jobs of one pass: handed out in ``ready_index`` order, one per free lane."""

    def __init__(self, jobs: Sequence[Job], *, prune: bool, stopping: threading.Event) -> None:
        self.pending: list[Job] = list(jobs)
        self.busy: list[CellSpec] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.prune, self.stopping = prune, stopping
        self._keys: dict[str, Any] = {}
        self._cond = threading.Condition()

    def take(self) -> Job | None:
        """The next job that may start, waiting for one; None when there is none left."""
        with self._cond:
            while True:
                if self.stopping.is_set() or not self.pending:
                    return None
                i = ready_index([j[0] for j in self.pending], self.busy, prune=self.prune, keys=self._keys)
                if i is not None:
                    job = self.pending.pop(i)
                    self.busy.append(job[0])
                    return job
                self._cond.wait()

    def done(self, cell: CellSpec, rec: dict[str, Any] | None) -> None:
        with self._cond:
            if rec is not None:  # None: --time-limit kept it from starting
                self.results[cell.cell_id] = rec
            self.busy.remove(cell)
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class GpuPool:
    """An executor over several GPUs; with one GPU it is a serial sweep pinned to that GPU."""

    def __init__(self, slots: Sequence[GpuSlot]) -> None:
        if not slots:
            raise ValueError("GpuPool needs GPU slots (harness.plan.gpus.parse_gpus)")
        self.slots: tuple[GpuSlot, ...] = tuple(slots)
        self.lanes: dict[int, Lane] = {}  # started lanes, by position in self.slots
        self.dead: set[int] = set()  # positions whose worker server is unusable
        self.worker_start_s: float | None = None
        self.throughput: dict[str, Any] | None = None

    @property
    def main(self) -> Lane | None:
        """GPU 1 of the list: env collection, loader checks, cells run outside a pass."""
        return self.lanes.get(0)

    @property
    def live(self) -> int:
        return max(1, len(self.slots) - len(self.dead))

    def _lane(self, sweep: Steps, pos: int) -> Lane:
        slot = self.slots[pos]
        launcher = ForkLauncher(sweep.open_store().dir / "logs" / slot.label, env=slot.pin_env())
        return Lane(launcher, label=slot.label,
                    placement=functools.partial(pin_fields, slot=slot, pool=[s.index for s in self.slots]))

    # -- lifecycle -----------------------------------------------------------------
    def start(self, sweep: Steps) -> None:
        """Every GPU's worker server, started side by side; the first one's through
        ``sweep.open_run``. A server that does not start leaves its GPU out."""
        t0 = time.monotonic()
        booted: dict[int, tuple[Lane, dict[str, Any], float]] = {}
        failed: dict[int, str] = {}

        def boot(pos: int) -> None:
            lane = self._lane(sweep, pos)
            t = time.monotonic()
            try:
                ready = lane.launcher.start()
            except Exception as exc:  # noqa: BLE001 - reported, the other GPUs go on
                failed[pos] = f"{type(exc).__name__}: {exc}"
                return
            booted[pos] = (lane, ready, time.monotonic() - t)

        threads = [threading.Thread(target=boot, args=(p,), name=f"boot-{self.slots[p].label}", daemon=True)
                   for p in range(1, len(self.slots))]
        for t in threads:
            t.start()
        self.lanes[0] = self._lane(sweep, 0)
        try:
            sweep.open_run(self.lanes[0])  # GPU 1 of the list: its server, env.json, run.json
        except BaseException:
            for t in threads:
                t.join()
            for lane, _, _ in booted.values():
                lane.launcher.close()
            raise
        for t in threads:
            t.join()
        self.worker_start_s = time.monotonic() - t0
        self._add_booted(sweep, booted, failed)

    def _add_booted(self, sweep: Steps, booted: dict[int, tuple[Lane, dict[str, Any], float]],
                    failed: dict[int, str]) -> None:
        env = sweep.env or {}
        pool = [dict(self.slots[0].to_dict(), worker_mode=env.get("worker_mode"), preload_s=env.get("worker_preload_s"))]
        for pos in range(1, len(self.slots)):
            slot = self.slots[pos]
            if pos in booted:
                lane, ready, dt = booted[pos]
                self.lanes[pos] = lane
                sweep.out(f"lora-harness: worker server for {slot.label} ready in {dt:.1f} s "
                          f"(cells start by {ready.get('mode')})")
                pool.append(dict(slot.to_dict(), worker_mode=ready.get("mode"), preload_s=ready.get("preload_s")))
            else:
                self.dead.add(pos)
                sweep.out(f"lora-harness: warning: {slot.label} left out: its worker server did not start "
                          f"({failed.get(pos)})")
                pool.append(dict(slot.to_dict(), error=failed.get(pos)))
        names = ", ".join(f"{s.label} ({s.name})" for p, s in enumerate(self.slots) if p not in self.dead)
        sweep.out(f"lora-harness: {len(self.slots) - len(self.dead)} GPU(s), one cell at a time each: {names}")
        if sweep.env is not None:
            sweep.env["gpu_pool"] = pool
            sweep.open_store().write_json("env.json", sweep.env)

    def close(self) -> None:
        lanes = list(self.lanes.values())
        self.lanes.clear()
        for lane in lanes:
            lane.launcher.close()

    # -- cells ---------------------------------------------------------------------
    def run_jobs(self, sweep: Steps, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Every job over the GPUs, a thread per live GPU; the records in job order."""
        jobs = first_of_each_cell(sweep, jobs)
        if not jobs:
            return []
        queue = _Queue(jobs, prune=sweep.config.prune, stopping=sweep.stopping)
        # before any server started (every cell replayed or past --time-limit) one lane
        # without a launcher hands the cells to the sweep's main lane
        lanes = [self.lanes[p] for p in sorted(self.lanes) if p not in self.dead] or [None]
        t0 = time.monotonic()
        self._run_lanes(sweep, queue, lanes)
        wall = time.monotonic() - t0
        if queue.pending:
            raise RunnerError(f"no GPU's worker server is usable any more; {len(queue.pending)} cell(s) not run "
                              f"(rerun with --resume)")
        order = {j[0].cell_id: i for i, j in enumerate(jobs)}
        sweep.records.sort(key=lambda r: order.get(r.get("cell_id"), len(order)))
        out = [queue.results[j[0].cell_id] for j in jobs if j[0].cell_id in queue.results]
        self._record_throughput(sweep, out, wall)
        return out

    def _run_lanes(self, sweep: Steps, queue: _Queue, lanes: list[Lane | None]) -> None:
        """A thread per lane until the queue is empty. Ctrl-C: no cell is handed out any
        more, the cells in flight are killed (their servers closed) and none is recorded."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="lora-gpu") as ex:
            futures = [ex.submit(self._lane_loop, sweep, queue, lane) for lane in lanes]
            try:
                while not all(f.done() for f in futures):
                    concurrent.futures.wait(futures, timeout=0.5)
            except BaseException:
                sweep.stopping.set()
                queue.wake()
                self.close()
                raise
        for f in futures:
            f.result()  # a bug in the loop itself is not swallowed

    def _lane_loop(self, sweep: Steps, queue: _Queue, lane: Lane | None) -> None:
        while (job := queue.take()) is not None:
            cell, suite, attempt = job
            try:
                rec = sweep.step(cell, suite=suite, attempt_unsupported=attempt, lane=lane, check_time=True)
            except Exception as exc:  # noqa: BLE001 - this GPU's server is unusable
                if sweep.stopping.is_set():
                    return
                lane = lane or sweep.lane
                pos = next((p for p, ln in self.lanes.items() if ln is lane), 0)
                self.dead.add(pos)
                queue.done(cell, self._server_failed(sweep, cell, lane, self.slots[pos], exc))
                return
            queue.done(cell, rec)

    def _server_failed(self, sweep: Steps, cell: CellSpec, lane: Lane, slot: GpuSlot,
                       exc: BaseException) -> dict[str, Any]:
        """The record of a cell whose GPU's worker server failed under it: a crash."""
        store, env = sweep.open_store(), sweep.env or {}
        worker = {"status": Status.CRASH.value,
                  "error": f"the worker server for {slot.label} failed ({type(exc).__name__}: {exc}); "
                           "its remaining cells go to the other GPUs"}
        rec = make_record(cell.to_dict(), cell.cell_id, store.run_id, worker,
                          {"wall_time_s": 0.0, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "hostname": env.get("hostname"), "worker_mode": env.get("worker_mode"),
                           "gpu_index": slot.index, "gpu_uuid": slot.uuid,
                           "gpu_pool": [s.index for s in self.slots],
                           "gpu_name": None if slot.fake else slot.name})
        return sweep.commit(rec, lane=lane, elapsed=0.0)

    def _record_throughput(self, sweep: Steps, records: list[dict[str, Any]], wall_s: float) -> None:
        gpus = [s.index for p, s in enumerate(self.slots) if p not in self.dead] or [self.slots[0].index]
        self.throughput = record_throughput(sweep, records, wall_s, gpus=gpus, worker_start_s=self.worker_start_s)


def record_throughput(sweep: Steps, records: list[dict[str, Any]], wall_s: float, *, gpus: list[Any],
                      worker_start_s: float | None, **more: Any) -> dict[str, Any]:
    """Cells per hour of a pass over ``gpus``, into run.json's latest invocation (read by
    ``harness.report.cell_rate``) and one line of output."""
    ran = [r for r in records if r.get("log") and not r.get("resumed")]
    t = {
        "gpus": list(gpus), "cells": len(records), "cells_run": len(ran), "cells_wall_s": round(wall_s, 3),
        "cells_per_hour": round(len(ran) * 3600.0 / wall_s, 2) if ran and wall_s > 0 else None,
        "worker_start_s": None if worker_start_s is None else round(worker_start_s, 3),
        "cell_time_s": round(sum(float(r.get("wall_time_s") or 0.0) for r in ran), 3), **more,
    }
    store = sweep.open_store()
    meta = store.read_json("run.json") or {"run_id": store.run_id, "invocations": []}
    if meta.get("invocations"):
        meta["invocations"][-1]["throughput"] = t
        store.write_json("run.json", meta)
    if t["cells_per_hour"]:
        sweep.out(f"lora-harness: {t['cells_run']} cells in {fmt_duration(wall_s)} on {len(t['gpus'])} GPU(s): "
                  f"{t['cells_per_hour']:,.0f} cells/hour")
    return t
