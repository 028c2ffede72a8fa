"""Executors: how a sweep's cells are spread over lanes (parent side; imports no torch).

A sweep (``harness.run.sweep.Sweep``) owns the run folder and the three steps of a cell:
``decide`` -> ``launch`` -> ``record``. An executor owns the lanes (``harness.run.launch.Lane``:
a launcher, a label, the record fields that say where a cell ran) and decides which cell
goes where and when:

    class Executor(Protocol):
        main: Lane | None        # env collection, loader checks, single cells; None until started
        live: int                # lanes running cells at once (the progress line's ETA)
        def start(self, sweep) -> None          # start the lanes; sweep.open_run(main) once
        def run_jobs(self, sweep, jobs) -> list[dict]   # records in job order
        def close(self) -> None

``run_jobs`` gets ``(cell, suite, attempt_unsupported)`` jobs and, for each, either calls
``sweep.step(cell, ..., lane=lane, check_time=True)`` or the steps one by one:

    d = sweep.decide(cell, suite=..., attempt_unsupported=..., check_time=True)
    if d.verdict is LAUNCH:  launched = sweep.launch(cell, lane.launcher)   (or elsewhere, see below)
    if d.verdict is not OUT_OF_TIME:  sweep.record(d, launched, lane=lane)

- ``SerialExecutor``: one lane, one fork server, cells in order.
- ``harness.run.pool.GpuPool`` (``--gpus``): a lane per GPU, each with a fork server
  pinned to its GPU and a thread in the parent; a cell is handed out only when no shorter
  cell of its row is pending or running (``ready_index``), so pruning decides as in a
  serial sweep.

A Ray executor (cells of a row as Ray tasks on remote nodes) fits the same shape, with
the driver as the only writer of the run folder:

- ``start(sweep)``: connect to the cluster; one actor per remote GPU, each holding a
  ``ForkLauncher`` on its node, is a lane (``label`` the node and GPU, ``placement`` the
  node and GPU fields); ``main`` is a local ``ForkLauncher`` (or one actor) for
  ``sweep.open_run``.
- ``run_jobs(sweep, jobs)``: the pool's scheduling, with ``ray.wait`` in place of the
  threads: while a lane is free, pick ``ready_index(pending, busy)``, ``d =
  sweep.decide(...)`` on the driver (it needs every record so far); for ``LAUNCH`` submit
  ``actor.launch.remote(cell.to_dict(), opts, timeout_s, log_path)``, which returns
  ``dataclasses.asdict(Launched)`` (the worker half and the bookkeeping: plain data; the
  log written on the node, shipped back or on a shared file system); when a task
  finishes, ``sweep.record(d, Launched(**result), lane=lane)`` on the driver. Cells that
  are not launched are recorded at once.
- ``close()``: kill the actors (their fork servers end with them).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from harness.core.spec import CellSpec
from harness.run.launch import ForkLauncher, Lane

# (cell, suite, attempt_unsupported): what Sweep.step takes
Job = tuple[CellSpec, "str | None", bool]


class Steps(Protocol):
    """What an executor uses of a sweep (``harness.run.sweep.Sweep``): its run folder and
    the steps of a cell. Executors never import the sweep; the sweep imports them."""

    def open_store(self) -> Any: ...

    def open_run(self, lane: Lane) -> None: ...

    def step(self, cell: CellSpec, *, suite: str | None = None, attempt_unsupported: bool = False,
             check_time: bool = False, lane: Lane | None = None) -> dict[str, Any] | None: ...


class Executor(Protocol):
    main: Lane | None
    live: int

    def start(self, sweep: Steps) -> None:
        """Start the lanes; hand the main one to ``sweep.open_run`` (env.json, run.json)."""

    def run_jobs(self, sweep: Steps, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Decide, launch and record every job; the records in job order, without the
        cells --time-limit kept from starting."""

    def close(self) -> None:
        """Stop every lane's launcher."""


def first_of_each_cell(sweep: Steps, jobs: Sequence[Job]) -> list[Job]:
    """The jobs of a parallel executor, each cell once (the first job naming it), with the
    sweep's main lane started when one of them will run (not replayed, not past
    --time-limit), so env.json and run.json exist before the lanes start."""
    seen: set[str] = set()
    jobs = [j for j in jobs if not (j[0].cell_id in seen or seen.add(j[0].cell_id))]
    if any(sweep.resumable(j[0]) is None for j in jobs) and not sweep.config.out_of_time(sweep.started_at):
        sweep.start()
    return jobs


class SerialExecutor:
    """One lane: one fork server, cells one after another in the order given."""

    live = 1

    def __init__(self) -> None:
        self.main: Lane | None = None

    def start(self, sweep: Steps) -> None:
        self.main = Lane(ForkLauncher(sweep.open_store().dir / "logs"))
        sweep.open_run(self.main)

    def run_jobs(self, sweep: Steps, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        records = []
        for cell, suite, attempt in jobs:
            rec = sweep.step(cell, suite=suite, attempt_unsupported=attempt, check_time=True)
            if rec is not None:
                records.append(rec)
        return records

    def close(self) -> None:
        if self.main is not None:
            self.main.launcher.close()
            self.main = None
