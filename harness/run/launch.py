"""Launchers: how a cell's process is started and how its end is read (parent side;
imports no torch).

A launcher runs one cell at a time and answers with a ``Launched``: the worker half of
the cell's record, however the cell ended (``ok`` ... ``crash`` / ``timeout``, see
``harness.run.forkserver.classify`` and ``harness.run.torchrun.merge_ranks``), and the
launcher's own bookkeeping (wall time, log file, exit code or signal). It never raises
for what the cell did; it raises when it cannot launch at all (its server is gone).

    class Launcher(Protocol):
        def start(self) -> dict                     # ready info (worker mode, preload time)
        def launch(self, cell, opts, *, timeout_s, log_path) -> Launched
        def run_job(self, target, args, *, timeout_s, log_path) -> JobOutcome
        def close(self) -> None

- ``ForkLauncher``: one fork server (``harness.run.forkserver``) that imported the
  libraries once and forks a fresh child per cell (``launched_from`` reads how a cell
  ended); ``run_job`` runs other jobs the same way (the host fingerprint, the loading
  checks, a checkpoint to write).
- ``TorchrunLauncher`` (``harness.run.torchrun``): a cell with ``world_size`` > 1, one
  torchrun per cell; it runs cells only.

The worker's clock readings (``harness.core.phases.TIMELINE``) are the launcher's to
consume: it turns them into the phases only it can time (spawn, teardown) or drops them,
so the worker half it returns carries no private key.

A ``Lane`` is a place where cells run one after another: a launcher, the label the
progress line gives it, and the record fields that say where a cell ran (the GPU it was
pinned to, under ``--gpus``). A sweep has one lane per fork server (``harness.run.sweep``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from harness.core.phases import attach_timers
from harness.core.spec import CellSpec
from harness.run.forkserver import ForkServerRunner, JobOutcome, classify

CELL_TARGET = "harness.cell.train:run_cell"


@dataclass
class Launched:
    """One cell as its launcher saw it. Plain data (a remote launcher can send it back
    as ``dataclasses.asdict``)."""

    worker: dict[str, Any]  # the worker half of the record
    wall_time_s: float  # from sending the cell until its process was seen to end
    log: str  # the cell's log file
    exit_code: int | None = None
    exit_signal: int | None = None


def launched_from(out: JobOutcome, timeout_s: float) -> Launched:
    """A cell's job outcome as a ``Launched`` (its clock readings turned into phases)."""
    worker = attach_timers(classify(out, timeout_s), t_submit=out.t_submit, t_exit=out.t_exit, wall_s=out.wall_s)
    return Launched(worker, out.wall_s, out.log_path, out.returncode, out.signal)


class Launcher(Protocol):
    def start(self) -> dict[str, Any]:
        """Start what the launcher keeps running between cells; what it says when ready."""

    def launch(self, cell: CellSpec, opts: dict[str, Any], *, timeout_s: float,
               log_path: str | os.PathLike) -> Launched:
        """Run one cell in a process of its own, within ``timeout_s``."""

    def run_job(self, target: str, args: dict[str, Any], *, timeout_s: float,
                log_path: str | os.PathLike) -> JobOutcome:
        """Run ``target(**args)`` (``"module:function"``) in a process of its own."""

    def close(self) -> None:
        """Stop what ``start`` started (a cell in flight is killed)."""


class ForkLauncher:
    """Cells and jobs through one fork server; ``env`` is the server's environment on top
    of this process's (``CUDA_VISIBLE_DEVICES`` pins it to one GPU)."""

    def __init__(self, work_dir: str | os.PathLike, *, env: dict[str, str] | None = None,
                 python: str | None = None) -> None:
        self.runner = ForkServerRunner(work_dir, env=env, python=python)

    def start(self) -> dict[str, Any]:
        return self.runner.start()

    def launch(self, cell: CellSpec, opts: dict[str, Any], *, timeout_s: float,
               log_path: str | os.PathLike) -> Launched:
        out = self.runner.run_job(CELL_TARGET, {"spec_dict": cell.to_dict(), "opts": opts}, timeout_s=timeout_s,
                                  log_path=log_path)
        return launched_from(out, timeout_s)

    def run_job(self, target: str, args: dict[str, Any], *, timeout_s: float,
                log_path: str | os.PathLike) -> JobOutcome:
        return self.runner.run_job(target, args, timeout_s=timeout_s, log_path=log_path)

    def close(self) -> None:
        self.runner.close()


def _nowhere(worker: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass
class Lane:
    """Where cells run one after another: a launcher, its label in the progress line,
    and ``placement(worker) -> fields``, the record fields that say where a cell ran."""

    launcher: Launcher
    label: str | None = None
    placement: Callable[[dict[str, Any]], dict[str, Any]] = field(default=_nowhere)
