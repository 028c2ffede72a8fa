"""Cells in parallel across GPUs (issue 8, ``--gpus``). Imports no torch.

One worker server per GPU, started with that GPU pinned (``harness.plan.gpus.GpuSlot.pin_env``:
``CUDA_VISIBLE_DEVICES=<its UUID>``), so every cell it forks sees one device and its NVML
sampler reads that device: memory and energy figures of one cell never include another
cell's. A thread per GPU in the parent takes cells from one queue and runs each through
the ordinary ``Sweep.run`` (capability rules, pruning, records, progress): the parent is
the only writer of ``results.jsonl`` and never imports torch.

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
cells through it before the first test, and each test then reports its cell's record
(see ``harness.pytest_plugin.pytest_runtestloop`` and NOTES.md for why not pytest-xdist).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, Sequence

from harness.plan.gpus import GpuSlot
from harness.plan.options import SweepConfig
from harness.plan.prune import row_key
from harness.core.record import Status, make_record
from harness.run.forkserver import ForkServerRunner, RunnerError
from harness.core.spec import CellSpec
from harness.core.store import RunStore
from harness.run.sweep import Sweep
from harness.core.fmt import fmt_duration, fmt_gib, fmt_rate, memory_of, status_text

# (cell, suite, attempt_unsupported): what Sweep.run takes
Job = tuple[CellSpec, "str | None", bool]


class _PoolStore(RunStore):
    """The pooled sweep's run folder: once the sweep is interrupted, nothing more is
    recorded (a cell killed by the interruption is not a result; --resume reruns it)."""

    stopping: threading.Event | None = None

    def append(self, record: dict[str, Any]) -> None:
        if self.stopping is not None and self.stopping.is_set():
            if not hasattr(self, "dropped"):
                self.dropped: set[int] = set()
            self.dropped.add(id(record))
            return
        super().append(record)


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


class ParallelSweep(Sweep):
    """A sweep over several GPUs; with one GPU it is a serial sweep pinned to that GPU."""

    def __init__(self, config: SweepConfig, facts: dict[str, Any], *, command: str = "",
                 out: Callable[[str], None] | None = None, total: int | None = None) -> None:
        if not config.gpus:
            raise ValueError("ParallelSweep needs config.gpus (harness.plan.gpus.parse_gpus)")
        self.slots: tuple[GpuSlot, ...] = tuple(config.gpus)
        self._tls = threading.local()
        self._runners: dict[int, ForkServerRunner] = {}  # by position in self.slots
        self._dead: set[int] = set()
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._prerun: dict[str, dict[str, Any]] = {}
        self._finished = 0
        self._pool_ran = 0
        self._pool_ran_time = 0.0
        self.worker_start_s: float | None = None
        self.throughput: dict[str, Any] | None = None
        super().__init__(config, facts, command=command, out=out, total=total)

    # The base class's single runner is the calling thread's GPU runner (a cell thread's
    # own; GPU 1 of the list otherwise, e.g. env collection or a fit search under --gpus).
    @property
    def runner(self) -> ForkServerRunner | None:  # type: ignore[override]
        mine = getattr(self._tls, "runner", None)
        return mine if mine is not None else self._runners.get(0)

    @runner.setter
    def runner(self, value: ForkServerRunner | None) -> None:
        if value is None:
            self._runners.pop(0, None)
        else:
            self._runners[0] = value

    def _slot(self) -> GpuSlot:
        return getattr(self._tls, "slot", None) or self.slots[0]

    # -- lifecycle -----------------------------------------------------------------
    def open_store(self) -> RunStore:
        if self.store is None:
            store = _PoolStore.open(self.config.run_dir, resume=self.config.resume)
            store.stopping = self._stopping
            self.store = store
            if self.config.resume:
                self.done = store.latest_by_cell()
        return self.store

    def _new_runner(self, work_dir) -> ForkServerRunner:
        slot = self.slots[0]
        return ForkServerRunner(work_dir / slot.label, env=slot.pin_env())

    def start(self) -> None:
        if self._runners.get(0) is not None:
            return
        store = self.open_store()
        t0 = time.monotonic()
        booted: dict[int, tuple[ForkServerRunner, dict[str, Any], float]] = {}
        failed: dict[int, str] = {}

        def boot(pos: int) -> None:
            slot = self.slots[pos]
            r = ForkServerRunner(store.dir / "logs" / slot.label, env=slot.pin_env())
            t = time.monotonic()
            try:
                ready = r.start()
            except Exception as exc:  # noqa: BLE001 - reported, the other GPUs go on
                failed[pos] = f"{type(exc).__name__}: {exc}"
                return
            booted[pos] = (r, ready, time.monotonic() - t)

        threads = [threading.Thread(target=boot, args=(p,), name=f"boot-{self.slots[p].label}", daemon=True)
                   for p in range(1, len(self.slots))]
        for t in threads:
            t.start()
        try:
            super().start()  # GPU 1 of the list: its server, env.json, run.json
        except BaseException:
            for t in threads:
                t.join()
            for r, _, _ in booted.values():
                r.close()
            raise
        for t in threads:
            t.join()
        self.worker_start_s = time.monotonic() - t0
        pool = [dict(self.slots[0].to_dict(), worker_mode=(self.env or {}).get("worker_mode"),
                     preload_s=(self.env or {}).get("worker_preload_s"))]
        for pos in range(1, len(self.slots)):
            slot = self.slots[pos]
            if pos in booted:
                r, ready, dt = booted[pos]
                self._runners[pos] = r
                self.out(f"lora-harness: worker server for {slot.label} ready in {dt:.1f} s "
                         f"(cells start by {ready.get('mode')})")
                pool.append(dict(slot.to_dict(), worker_mode=ready.get("mode"), preload_s=ready.get("preload_s")))
            else:
                self._dead.add(pos)
                self.out(f"lora-harness: warning: {slot.label} left out: its worker server did not start "
                         f"({failed.get(pos)})")
                pool.append(dict(slot.to_dict(), error=failed.get(pos)))
        names = ", ".join(f"{s.label} ({s.name})" for p, s in enumerate(self.slots) if p not in self._dead)
        self.out(f"lora-harness: {len(self.slots) - len(self._dead)} GPU(s), one cell at a time each: {names}")
        if self.env is not None:
            self.env["gpu_pool"] = pool
            store.write_json("env.json", self.env)

    def close(self) -> None:
        runners = list(self._runners.values())
        self._runners.clear()
        for r in runners:
            r.close()

    # -- cells ---------------------------------------------------------------------
    def run(self, cell: CellSpec, *, suite: str | None = None, attempt_unsupported: bool = False) -> dict[str, Any]:
        """A cell's record: from the pooled pass (pytest) when it ran there, else run now
        on the first GPU of the list."""
        rec = self._prerun.get(cell.cell_id)
        if rec is not None:
            return rec
        return super().run(cell, suite=suite, attempt_unsupported=attempt_unsupported)

    def run_all(self, cells=None) -> list[dict[str, Any]]:
        self.run_jobs([(c, None, False) for c in (cells if cells is not None else self.config.cells)])
        return self.records

    def prerun(self, jobs: Sequence[Job]) -> dict[str, dict[str, Any]]:
        """Run ``jobs`` over the pool now; later ``run`` calls for them return their
        records. Returns the records by cell id."""
        recs = {r["cell_id"]: r for r in self.run_jobs(jobs)}
        self._prerun.update(recs)
        return recs

    def run_jobs(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Run every job over the GPUs; returns the records in job order (without the
        cells --time-limit kept from starting: ``self.not_started``)."""
        seen: set[str] = set()
        jobs = [j for j in jobs if not (j[0].cell_id in seen or seen.add(j[0].cell_id))]
        if not jobs:
            return []
        if any(j[0].cell_id not in self.done for j in jobs) and not self.config.out_of_time(self.started_at):
            self.start()
        pending: list[Job] = list(jobs)
        busy: list[CellSpec] = []
        results: dict[str, dict[str, Any]] = {}
        keys: dict[str, Any] = {}
        cond = threading.Condition()
        prune = self.config.prune

        def take() -> Job | None:
            with cond:
                while True:
                    if self._stopping.is_set() or not pending:
                        return None
                    i = ready_index([j[0] for j in pending], busy, prune=prune, keys=keys)
                    if i is not None and self.out_of_time(pending[i][0]):
                        pending.pop(i)  # --time-limit: not run, not recorded (--resume)
                        continue
                    if i is not None:
                        job = pending.pop(i)
                        busy.append(job[0])
                        return job
                    cond.wait()

        def gpu_loop(pos: int) -> None:
            self._tls.slot = self.slots[pos]
            self._tls.runner = self._runners.get(pos)
            while True:
                job = take()
                if job is None:
                    return
                cell, suite, attempt = job
                try:
                    rec = Sweep.run(self, cell, suite=suite, attempt_unsupported=attempt)
                except Exception as exc:  # noqa: BLE001 - this GPU's server is unusable
                    if self._stopping.is_set():
                        return
                    rec = self._server_failed(cell, exc)
                    with cond:
                        results[cell.cell_id] = rec
                        busy.remove(cell)
                        self._dead.add(pos)
                        cond.notify_all()
                    return
                with cond:
                    results[cell.cell_id] = rec
                    busy.remove(cell)
                    cond.notify_all()

        live = [p for p in range(len(self.slots)) if p not in self._dead] if self._runners else [0]
        t0 = time.monotonic()
        interrupted: BaseException | None = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(live), thread_name_prefix="lora-gpu") as ex:
            futures = [ex.submit(gpu_loop, p) for p in live]
            try:
                while not all(f.done() for f in futures):
                    concurrent.futures.wait(futures, timeout=0.5)
            except BaseException as exc:  # Ctrl-C: stop handing out cells, kill those in flight
                interrupted = exc
                self._stopping.set()
                with cond:
                    cond.notify_all()
                self.close()
        if interrupted is not None:
            dropped = getattr(self.store, "dropped", set())
            self.records = [r for r in self.records if id(r) not in dropped]
            raise interrupted
        for f in futures:
            f.result()  # a bug in the loop itself is not swallowed
        wall = time.monotonic() - t0
        if pending:
            raise RunnerError(f"no GPU's worker server is usable any more; {len(pending)} cell(s) not run "
                              f"(rerun with --resume)")
        order = {j[0].cell_id: i for i, j in enumerate(jobs)}
        self.records.sort(key=lambda r: order.get(r.get("cell_id"), len(order)))
        out = [results[j[0].cell_id] for j in jobs if j[0].cell_id in results]  # --time-limit leaves some out
        self._record_throughput(out, wall)
        return out

    def _server_failed(self, cell: CellSpec, exc: BaseException) -> dict[str, Any]:
        slot = self._slot()
        store = self.open_store()
        env = self.env or {}
        worker = {"status": Status.CRASH.value,
                  "error": f"the worker server for {slot.label} failed ({type(exc).__name__}: {exc}); "
                           "its remaining cells go to the other GPUs"}
        rec = make_record(cell.to_dict(), cell.cell_id, store.run_id, worker,
                          {"wall_time_s": 0.0, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "hostname": env.get("hostname"), "worker_mode": env.get("worker_mode"),
                           "gpu_index": slot.index, "gpu_uuid": slot.uuid,
                           "gpu_pool": [s.index for s in self.slots],
                           "gpu_name": None if slot.fake else slot.name})
        store.append(rec)
        self.records.append(rec)
        self._progress(rec, elapsed=0.0)
        return rec

    def _pin_fields(self, worker: dict[str, Any]) -> dict[str, Any]:
        """The GPU a cell was pinned to, in its record. The worker's own NVML reading
        (``gpu_index`` / ``gpu_uuid``, the device its sampler read) wins; a cell that
        died before saying is given its slot's; a disagreement is flagged."""
        fields: dict[str, Any] = {"gpu_pool": [s.index for s in self.slots]}
        if worker.get("pruned") or worker.get("predicted_unsupported"):
            return fields  # never started: it ran on no GPU
        slot = self._slot()
        measured = worker.get("gpu_index")
        fields["gpu_index"] = measured if measured is not None else slot.index
        fields["gpu_uuid"] = worker.get("gpu_uuid") or slot.uuid
        if measured is not None and measured != slot.index:
            fields["gpu_pin_mismatch"] = True
        if worker.get("device") != "cuda" and not slot.fake:
            fields["gpu_name"] = slot.name  # crash / timeout before the worker named its device
        return fields

    def _record_throughput(self, records: list[dict[str, Any]], wall_s: float) -> None:
        """Cells per hour of this pass, into run.json's latest invocation."""
        ran = [r for r in records if r.get("log") and not r.get("resumed")]
        self.throughput = {
            "gpus": [s.index for p, s in enumerate(self.slots) if p not in self._dead] or [self.slots[0].index],
            "cells": len(records), "cells_run": len(ran), "cells_wall_s": round(wall_s, 3),
            "cells_per_hour": round(len(ran) * 3600.0 / wall_s, 2) if ran and wall_s > 0 else None,
            "worker_start_s": None if self.worker_start_s is None else round(self.worker_start_s, 3),
            "cell_time_s": round(sum(float(r.get("wall_time_s") or 0.0) for r in ran), 3),
        }
        store = self.open_store()
        meta = store.read_json("run.json") or {"run_id": store.run_id, "invocations": []}
        if meta.get("invocations"):
            meta["invocations"][-1]["throughput"] = self.throughput
            store.write_json("run.json", meta)
        t = self.throughput
        if t["cells_per_hour"]:
            self.out(f"lora-harness: {t['cells_run']} cells in {fmt_duration(wall_s)} on {len(t['gpus'])} GPU(s): "
                     f"{t['cells_per_hour']:,.0f} cells/hour")

    def _progress(self, rec: dict[str, Any], *, resumed: bool = False, elapsed: float | None = None) -> None:
        if self._stopping.is_set():
            return
        with self._lock:
            self._finished += 1
            ran = bool(rec.get("log")) and not resumed
            if ran:
                self._pool_ran += 1
                self._pool_ran_time += float(rec.get("wall_time_s") or 0.0)
            kind, mem = memory_of(rec)
            total_elapsed = time.monotonic() - self._t0
            live = max(1, len(self.slots) - len(self._dead))
            remaining = max(0, self.total - self._finished)
            eta = (self._pool_ran_time / self._pool_ran) * remaining / live if self._pool_ran else None
            if self.total <= 0:
                eta = None
            pos = f"{self._finished}/{self.total}" if self.total > 0 else f"{self._finished}"
            where = "" if resumed or not ran and rec.get("status") != Status.CRASH.value else f"{self._slot().label} "
            what = "resumed" if resumed else fmt_duration(elapsed)
            tps = fmt_rate(rec.get("tokens_per_s")) if rec.get("status") == "ok" else "-"
            line = (f"[{pos}] {where}{rec['cell_id']}: {status_text(rec)}, peak {fmt_gib(mem)} {kind}, "
                    f"{tps} tokens/s ({what}; elapsed {fmt_duration(total_elapsed)}, ETA {fmt_duration(eta)})")
            if rec.get("status") not in ("ok", "oom") and rec.get("error"):
                line += f"\n    {str(rec['error']).splitlines()[0][:300]}"
            if rec.get("nonfinite_message"):
                line += f"\n    {rec['nonfinite_message'][:300]}"
            if rec.get("gpu_pin_mismatch"):
                line += (f"\n    warning: pinned to {self._slot().label} but NVML read GPU {rec.get('gpu_index')}: "
                         "memory figures of this cell may be another GPU's")
            self.out(line)
