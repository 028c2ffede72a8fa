"""Cells over the GPUs of other machines: the scheduling behind ``--ray``
(``harness.run.ray_executor``), written against two small protocols so that it runs, and
is tested, without Ray. Imports no torch, no ray.

- A *worker* (``Remote``) is one GPU of some node with a process on it that holds a fork
  server pinned to that GPU. The driver (this process) sees it as a lane
  (``harness.run.launch.Lane``): it is its own launcher for the blocking calls of the main
  lane (env.json, single cells) and, for the sweep, takes one cell at a time
  asynchronously: ``submit`` gives a handle, ``finish`` turns the finished handle into a
  ``Launched`` (the cell's log comes back with it and is written into the run folder here,
  since nodes need not share a file system).
- A *cluster* (``Cluster``) makes one worker per GPU, a new one in place of a lost one,
  and waits on handles.

The driver is the only writer of the run folder and the only one that decides: every
cell goes through ``sweep.decide`` here, with every record so far, and ``sweep.record``
here. Order is the GPU pool's (``harness.run.pool.ready_index``): a cell is handed out
only when no shorter cell of its row is pending or in flight, so a row runs in ascending
length, whichever GPUs its cells land on, and pruning decides exactly as in a serial sweep.

A worker lost mid-cell (its process, its fork server or its node went away: ``Lost``) is
not a result of the cell. The cell goes back into the queue in its place, its longer row
mates still behind it, and runs again on another worker; the lost worker is replaced
when the cluster can start one. A cell whose worker was lost ``max_lost`` times is
recorded as ``crash`` with the reasons. A worker whose fork server cannot run cells (an
error other than a loss) records its cell as ``crash`` and leaves the sweep, as in the
GPU pool. Ctrl-C: the workers are stopped and nothing in flight is recorded.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from harness.core.spec import CellSpec
from harness.run.executors import Job, Steps, first_of_each_cell
from harness.run.forkserver import RunnerError
from harness.run.launch import Lane, Launched
from harness.run.pool import ready_index, record_throughput

LAUNCH, OUT_OF_TIME = "launch", "out_of_time"  # harness.run.sweep.Verdict values (executors never import the sweep)


class Lost(Exception):
    """The worker running a cell went away (not the cell's doing): the cell runs again."""


class Remote(Protocol):
    """One GPU of the cluster with its worker, as the driver sees it. Also a ``Launcher``
    (``start`` / ``launch`` / ``run_job`` / ``close``, blocking) for the main lane."""

    lane: Lane
    label: str
    info: dict[str, Any] | None  # what it said when it started (env.json lists it)

    def boot(self) -> Any:
        """Start the worker (its fork server); a handle that ``Cluster.wait`` reports."""

    def booted(self, handle: Any) -> dict[str, Any]:
        """What the started worker says (``ready``: its fork server's ready line); raises
        when it did not start."""

    def submit(self, cell: CellSpec, opts: dict[str, Any], timeout_s: float, log_path: Path) -> Any:
        """Send a cell; a handle that ``Cluster.wait`` reports when it ended."""

    def finish(self, handle: Any, log_path: Path) -> Launched:
        """The cell's ``Launched``, its log written to ``log_path``; ``Lost`` when the
        worker went away, another exception when it cannot run cells."""

    def kill(self) -> None:
        """Stop the worker now (a cell in flight is killed with it)."""

    def close(self) -> None:
        """Stop the worker, keeping its own logs (its fork server's) in the run folder."""


class Cluster(Protocol):
    boot_timeout_s: float  # how long cells may wait for a worker when none is running
    grace_s: float  # beyond a cell's own time limit, how long the driver waits for its answer

    def workers(self, logs_dir: Path) -> list[Remote]:
        """One worker per GPU, not started yet."""

    def replace(self, lost: Remote) -> Remote | None:
        """A new worker in place of a lost one (placed wherever a GPU is free), or None."""

    def wait(self, handles: list[Any], timeout_s: float) -> list[Any]:
        """The handles that are done, waiting up to ``timeout_s`` for at least one."""

    def describe(self) -> dict[str, Any]:
        """What run.json's throughput says about the cluster."""

    def shutdown(self) -> None:
        """Let go of the cluster (a local one is stopped)."""


@dataclass
class _Flight:
    """A cell sent to a worker."""

    decision: Any  # harness.run.sweep.Decision
    job: Job
    worker: Remote
    log_path: Path
    deadline: float


class RemoteExecutor:
    """An executor over a cluster's GPUs, one cell at a time per GPU (see the module)."""

    max_lost = 3  # runs of a cell lost with their worker before it is recorded as a crash

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.idle: list[Remote] = []  # started, no cell
        self.booting: dict[Any, Remote] = {}  # boot handle -> worker
        self.flights: dict[Any, _Flight] = {}  # cell handle -> the cell
        self.gone: set[int] = set()  # id() of workers stopped or lost
        self.lost: dict[str, list[str]] = {}  # cell id -> why each of its runs was lost
        self.replacements_left = 0
        self.worker_start_s: float | None = None
        self.throughput: dict[str, Any] | None = None
        self._main: Remote | None = None
        self._boot_t: dict[int, float] = {}  # id() of a booting worker -> when it was asked to start
        self._ran_on: set[str] = set()  # labels of the workers that ran cells (run.json's throughput)

    @property
    def main(self) -> Lane | None:
        """A started worker's lane: env collection, loader checks, cells run outside a pass."""
        return self._main.lane if self._main is not None else None

    @property
    def live(self) -> int:
        return max(1, len(self.idle) + len(self.booting) + len(self.flights))

    # -- lifecycle -----------------------------------------------------------------
    def start(self, sweep: Steps) -> None:
        """A worker per GPU, started side by side; the first one's through
        ``sweep.open_run`` (env.json describes its node). The others join as they come."""
        t0 = time.monotonic()
        workers = self.cluster.workers(sweep.open_store().dir / "logs")
        if not workers:
            raise RunnerError("the cluster has no GPU to run cells on")
        self.replacements_left = self.max_lost * len(workers)
        for w in workers[1:]:
            self._boot(sweep, w)
        try:
            sweep.open_run(workers[0].lane)  # its start(): the worker's boot, waited for
        except BaseException:
            self._main = workers[0]
            self.close()
            raise
        self._main = workers[0]
        self.worker_start_s = time.monotonic() - t0
        self.idle.append(workers[0])
        self._joined(sweep, workers[0], None)

    def close(self) -> None:
        idle, others = self.idle, [f.worker for f in self.flights.values()] + list(self.booting.values())
        self.idle, self.flights, self.booting = [], {}, {}
        for w in others:
            self._stop(w, graceful=False)
        for w in idle:
            self._stop(w, graceful=True)
        if self._main is not None and id(self._main) not in self.gone:
            self._stop(self._main, graceful=True)
        self.cluster.shutdown()

    def _stop(self, w: Remote, *, graceful: bool) -> None:
        self.gone.add(id(w))
        try:
            w.close() if graceful else w.kill()
        except Exception:  # noqa: BLE001 - a worker already gone has nothing to stop
            pass

    def _boot(self, sweep: Steps, w: Remote) -> None:
        try:
            self._boot_t[id(w)] = time.monotonic()
            self.booting[w.boot()] = w
        except Exception as exc:  # noqa: BLE001 - reported, the other GPUs go on
            sweep.out(f"lora-harness: warning: a worker did not start ({one_line(exc)}); its GPU is left out")

    def _joined(self, sweep: Steps, w: Remote, t_boot: float | None) -> None:
        """A worker ready: said (but the first, which ``open_run`` announced), listed in
        env.json, and the main lane if that one is gone."""
        info = w.info or {}
        if t_boot is not None:
            sweep.out(f"lora-harness: worker for {w.label} ready in {time.monotonic() - t_boot:.1f} s "
                      f"(cells start by {(info.get('ready') or {}).get('mode')})")
        if self._main is None or id(self._main) in self.gone:
            self._main = w
        env = getattr(sweep, "env", None)
        if env is not None:
            env.setdefault("workers", []).append(dict(info, label=w.label))
            sweep.open_store().write_json("env.json", env)

    # -- cells ---------------------------------------------------------------------
    def run_jobs(self, sweep: Steps, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Every job over the cluster's GPUs; the records in job order."""
        jobs = first_of_each_cell(sweep, jobs)
        if not jobs:
            return []
        order = {j[0].cell_id: i for i, j in enumerate(jobs)}
        pending, results = list(jobs), {}
        t0 = time.monotonic()
        try:
            self._loop(sweep, pending, results, order)
        except BaseException:
            sweep.stopping.set()
            self.close()
            raise
        sweep.records.sort(key=lambda r: order.get(r.get("cell_id"), len(order)))
        out = [results[j[0].cell_id] for j in jobs if j[0].cell_id in results]
        self.throughput = record_throughput(sweep, out, time.monotonic() - t0, gpus=sorted(self._ran_on),
                                            worker_start_s=self.worker_start_s, cluster=self.cluster.describe(),
                                            requeued=sum(len(v) for v in self.lost.values()))
        return out

    def _loop(self, sweep: Steps, pending: list[Job], results: dict[str, Any], order: dict[str, int]) -> None:
        keys: dict[str, Any] = {}
        starved_since: float | None = None
        while not sweep.stopping.is_set():
            self._hand_out(sweep, pending, results, keys)
            if not pending and not self.flights:
                return
            if pending and not self.flights and not self.idle and self._main is not None:
                # cells wait, no worker runs: only workers still starting can take them
                starved_since = starved_since or time.monotonic()
                waited = time.monotonic() - starved_since
                if not self.booting or waited > self.cluster.boot_timeout_s:
                    why = "no worker is usable any more" if not self.booting else \
                        f"no worker started within {self.cluster.boot_timeout_s:g} s"
                    raise RunnerError(f"{why}; {len(pending)} cell(s) not run (rerun with --resume)")
            else:
                starved_since = None
            for h in self.cluster.wait([*self.flights, *self.booting], 1.0):
                if h in self.booting:
                    self._on_boot(sweep, h)
                elif h in self.flights:
                    self._on_cell(sweep, self.flights.pop(h), h, pending, results, order)
            now = time.monotonic()
            for h, f in list(self.flights.items()):
                if now > f.deadline:  # the node stopped answering without being declared dead
                    del self.flights[h]
                    self._lost(sweep, f, f"no answer within the cell's time limit + {self.cluster.grace_s:g} s",
                               pending, results, order)

    def _hand_out(self, sweep: Steps, pending: list[Job], results: dict[str, Any], keys: dict[str, Any]) -> None:
        """Decide the cells that may start now, while a worker is free: record those that
        need no worker, send the others. Before anything started (every cell replayed or
        past --time-limit) no worker is needed."""
        while pending and (self.idle or self._main is None):
            busy = [f.job[0] for f in self.flights.values()]
            i = ready_index([j[0] for j in pending], busy, prune=sweep.config.prune, keys=keys)
            if i is None:
                return
            job = pending.pop(i)
            cell, suite, attempt = job
            d = sweep.decide(cell, suite=suite, attempt_unsupported=attempt, check_time=True)
            if d.verdict == OUT_OF_TIME:
                continue
            if d.verdict != LAUNCH:
                results[cell.cell_id] = sweep.record(d)
                continue
            w = self.idle.pop(0)
            log_path = sweep.open_store().log_path(cell.cell_id)
            timeout = sweep.config.cell_timeout_s
            try:
                h = w.submit(cell, sweep.config.worker_opts(), timeout, log_path)
            except Exception as exc:  # noqa: BLE001 - a worker gone before it took the cell
                pending.insert(0, job)
                sweep.out(f"lora-harness: warning: {w.label} could not take {cell.cell_id} ({one_line(exc)}); "
                          "it is replaced")
                self._replace(sweep, w)
                continue
            self.flights[h] = _Flight(d, job, w, log_path, time.monotonic() + timeout + self.cluster.grace_s)

    def _on_boot(self, sweep: Steps, h: Any) -> None:
        w = self.booting.pop(h)
        t_boot = self._boot_t.pop(id(w), time.monotonic())
        try:
            w.booted(h)
        except Exception as exc:  # noqa: BLE001 - reported, the other GPUs go on
            self._stop(w, graceful=False)
            sweep.out(f"lora-harness: warning: a worker did not start ({one_line(exc)}); its GPU is left out")
            return
        self.idle.append(w)
        self._joined(sweep, w, t_boot)

    def _on_cell(self, sweep: Steps, f: _Flight, h: Any, pending: list[Job], results: dict[str, Any],
                 order: dict[str, int]) -> None:
        cell = f.decision.cell
        try:
            launched = f.worker.finish(h, f.log_path)
        except Lost as exc:
            self._lost(sweep, f, str(exc), pending, results, order)
            return
        except Exception as exc:  # noqa: BLE001 - this worker's fork server cannot run cells
            why = f"the worker for {f.worker.label} failed ({one_line(exc)}); its remaining cells go to the others"
            results[cell.cell_id] = self._crash(sweep, f, why)
            self._stop(f.worker, graceful=False)
            return
        results[cell.cell_id] = sweep.record(f.decision, launched, lane=self._lane(f))
        self._ran_on.add(f.worker.label)
        self.idle.append(f.worker)

    def _lane(self, f: _Flight) -> Lane:
        """The worker's lane; a cell that ran again after losing its worker says how often."""
        n = len(self.lost.get(f.decision.cell.cell_id, ()))
        if not n:
            return f.worker.lane
        base = f.worker.lane.placement
        return dataclasses.replace(f.worker.lane, placement=lambda worker: dict(base(worker), ray_requeued=n))

    def _crash(self, sweep: Steps, f: _Flight, why: str) -> dict[str, Any]:
        d = dataclasses.replace(f.decision, worker={"status": "crash", "error": why})
        return sweep.record(d, None, lane=self._lane(f))

    def _lost(self, sweep: Steps, f: _Flight, why: str, pending: list[Job], results: dict[str, Any],
              order: dict[str, int]) -> None:
        """The cell's worker went away: the cell runs again (in its place in the queue, so
        its row mates still wait for it), or after ``max_lost`` losses it is a crash."""
        cell = f.decision.cell
        reasons = self.lost.setdefault(cell.cell_id, [])
        reasons.append(why)
        if len(reasons) >= self.max_lost:
            results[cell.cell_id] = self._crash(sweep, f, f"its worker was lost {len(reasons)} times while running "
                                                          f"it (last on {f.worker.label}: {why})")
            note = "recorded as crash"
        else:
            pending.append(f.job)
            pending.sort(key=lambda j: order[j[0].cell_id])
            note = f"it runs again ({len(reasons)}/{self.max_lost - 1} retries)"
        sweep.out(f"lora-harness: warning: {f.worker.label} was lost while running {cell.cell_id} ({why}); {note}")
        self._replace(sweep, f.worker)

    def _replace(self, sweep: Steps, w: Remote) -> None:
        """Stop ``w`` and start a new worker wherever the cluster has a free GPU."""
        self._stop(w, graceful=False)
        if self.replacements_left <= 0:
            sweep.out(f"lora-harness: warning: {w.label} is not replaced: {self.max_lost} workers per GPU were lost")
            return
        self.replacements_left -= 1
        new = self.cluster.replace(w)
        if new is not None:
            self._boot(sweep, new)


def one_line(exc: BaseException) -> str:
    """An exception as one line (a remote one's text carries its whole traceback)."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
