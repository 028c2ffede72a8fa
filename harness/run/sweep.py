"""A sweep: cells run one after another through the fork server, each record appended to
the run folder the moment its cell ends. The pytest plugin and the CLI are both thin
skins over this class. Imports no torch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from harness.plan import capability
from harness.plan.options import SweepConfig
from harness.core.phases import process_started_at
from harness.plan.prune import pruned_by, pruned_record
from harness.core.record import Status, make_record
from harness.run.forkserver import ForkServerRunner, classify
from harness.core.spec import CellSpec
from harness.core.store import RunStore
from harness.core.fmt import fmt_duration, fmt_gib, fmt_rate, memory_of, status_text


class Sweep:
    def __init__(self, config: SweepConfig, facts: dict[str, Any], *, command: str = "",
                 out: Callable[[str], None] | None = None, total: int | None = None) -> None:
        self.config = config
        self.facts = dict(facts, device_pref=config.device, use_gpu=bool(facts.get("has_gpu")) and config.device != "cpu")
        self.command = command or " ".join(sys.argv)
        self.out = out or (lambda s: print(s, flush=True))
        self.total = total if total is not None else len(config.cells)
        self.store: RunStore | None = None
        self.runner: ForkServerRunner | None = None
        self.env: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.done: dict[str, dict[str, Any]] = {}
        self._t0 = time.monotonic()
        self._ran = 0
        self._ran_time = 0.0
        self._index = 0
        self.started_at = process_started_at()  # what --time-limit counts from
        self.not_started: list[str] = []  # cells --time-limit kept from starting

    # -- lifecycle -----------------------------------------------------------------
    def open_store(self) -> RunStore:
        """Create / reopen the run folder (cheap; no worker started)."""
        if self.store is None:
            self.store = RunStore.open(self.config.run_dir, resume=self.config.resume)
            if self.config.resume:
                self.done = self.store.latest_by_cell()
        return self.store

    def start(self) -> None:
        if self.runner is not None:
            return
        store = self.open_store()
        self.runner = self._new_runner(store.dir / "logs")
        t0 = time.monotonic()
        ready = self.runner.start()
        server_s = time.monotonic() - t0  # issue 7: the sweep's fixed cost (env.json)
        self.out(f"lora-harness: worker server ready in {time.monotonic() - t0:.1f} s "
                 f"(libraries imported once in {ready.get('preload_s', 0):.1f} s; cells start by {ready.get('mode')})")
        for err in ready.get("preload_errors") or []:
            self.out(f"lora-harness: warning: could not preload {err}")
        env_out = self.runner.run_job("harness.cell.env:collect", {}, timeout_s=300, log_path=store.dir / "logs" / "env.log")
        self.env = env_out.result or {"error": classify(env_out, 300).get("error")}
        self.env["worker_mode"] = ready.get("mode")
        self.env["worker_mode_reason"] = ready.get("why")
        self.env["worker_preload_s"] = ready.get("preload_s")
        self.env["worker_start_s"] = server_s  # issue 7: server start, preload included
        self.env["env_collect_s"] = env_out.wall_s  # issue 7
        store.write_json("env.json", self.env)
        meta = store.read_json("run.json") or {}
        invocations = meta.get("invocations", [])
        invocations.append({"command": self.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "options": self.config.options, "matrix": self.config.matrix,
                            "cells": len(self.config.cells)})
        shard = {"shard": self.config.shard.to_json()} if self.config.shard else {}  # for `lora-harness shards`
        store.write_json("run.json", {"run_id": store.run_id, "invocations": invocations, **shard})
        self.out(f"lora-harness: run folder {store.dir}")

    # issue 8: hooks harness.run.pool.ParallelSweep overrides (a worker server pinned to each
    # GPU, the GPU in each record); the serial sweep is unchanged by them
    def _new_runner(self, work_dir) -> ForkServerRunner:
        return ForkServerRunner(work_dir)

    def _pin_fields(self, worker: dict[str, Any]) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def __enter__(self) -> "Sweep":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- cells ---------------------------------------------------------------------
    def run(self, cell: CellSpec, *, suite: str | None = None, attempt_unsupported: bool = False) -> dict[str, Any]:
        """Run one cell (or replay its stored record when resuming) and record it.

        A cell the capability rules predict unsupported is recorded as such without being
        started, unless ``attempt_unsupported`` (the compatibility suite): then it runs
        anyway and the record holds both the prediction and what really happened.
        ``suite`` names the suite the record belongs to (compat, stability).
        """
        self._index += 1
        store = self.open_store()
        if cell.cell_id in self.done:
            rec = dict(self.done[cell.cell_id], resumed=True)
            self.records.append(rec)
            self._progress(rec, resumed=True)
            return rec
        self.start()  # every run folder gets env.json, even if no cell can run here
        prediction = capability.verdict(cell, self.facts)
        reason = prediction.reason
        cause = pruned_by(cell, self.records) if self.config.prune else None
        t0 = time.monotonic()
        if reason and not attempt_unsupported:
            worker = {"status": Status.UNSUPPORTED.value, "error": reason, "predicted_unsupported": True}
            extra: dict[str, Any] = {"wall_time_s": 0.0}
        elif cause:
            worker = pruned_record(cell, cause)
            extra = {"wall_time_s": 0.0}
        elif cell.world_size > 1:  # issue 8: torchrun cells, not through the fork server
            worker, extra = self._run_dist(cell, store)
        else:
            assert self.runner is not None
            log = store.log_path(cell.cell_id)
            outcome = self.runner.run_job("harness.cell.train:run_cell",
                                          {"spec_dict": cell.to_dict(), "opts": self.config.worker_opts()},
                                          timeout_s=self.config.cell_timeout_s, log_path=log)
            worker = classify(outcome, self.config.cell_timeout_s)
            extra = {"wall_time_s": outcome.wall_s, "log": os.path.relpath(log, store.dir),
                     "exit_code": outcome.returncode, "exit_signal": outcome.signal}
            self._ran += 1
            self._ran_time += outcome.wall_s
        env = self.env or {}
        if cell.world_size > 1:  # issue 8: against this run's one-GPU cell
            from harness.run.torchrun import scaling_fields

            extra.update(scaling_fields(cell, worker, list(self.done.values()) + self.records))
        extra["prediction"] = prediction.to_dict()
        if suite:
            extra["suite"] = suite
        extra.update({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hostname": env.get("hostname"),
                      "gpu_name": worker.get("device_name") if worker.get("device") == "cuda" else env.get("gpu_name"),
                      "worker_mode": env.get("worker_mode")})
        extra.update(self._pin_fields(worker))  # issue 8: which GPU (harness.run.pool)
        rec = make_record(cell.to_dict(), cell.cell_id, store.run_id, worker, extra)
        store.append(rec)
        self.records.append(rec)
        self._progress(rec, elapsed=time.monotonic() - t0)
        return rec

    def _run_dist(self, cell: CellSpec, store) -> tuple[dict[str, Any], dict[str, Any]]:
        """issue 8: one torchrun cell (harness/run/torchrun.py); the worker half and the extras."""
        from harness.run import torchrun as dist

        log = store.log_path(cell.cell_id)
        out = dist.launch(cell, self.config.worker_opts(), timeout_s=self.config.cell_timeout_s, log_path=log,
                          work_dir=store.dir / "logs")
        self._ran += 1
        self._ran_time += out.wall_s
        return dist.merge_ranks(cell, out, self.config.cell_timeout_s), {
            "wall_time_s": out.wall_s, "log": os.path.relpath(log, store.dir), "exit_code": out.returncode,
            "exit_signal": out.signal}

    def out_of_time(self, cell: CellSpec) -> bool:
        """--time-limit: whether ``cell`` must not start (a recorded cell replays anyway).
        Such a cell is not run and not recorded; ``--resume`` runs it later."""
        if cell.cell_id in self.done or not self.config.out_of_time(self.started_at):
            return False
        if not self.not_started:
            self.out(f"lora-harness: --time-limit {self.config.time_limit_s:g} s reached: no new cell starts; "
                     "rerun with --resume to continue")
        self.not_started.append(cell.cell_id)
        return True

    def run_all(self, cells=None) -> list[dict[str, Any]]:
        for cell in cells if cells is not None else self.config.cells:
            if self.out_of_time(cell):
                continue
            self.run(cell)
        return self.records

    def _progress(self, rec: dict[str, Any], *, resumed: bool = False, elapsed: float | None = None) -> None:
        kind, mem = memory_of(rec)
        total_elapsed = time.monotonic() - self._t0
        remaining = max(0, self.total - self._index)
        eta = (self._ran_time / self._ran) * remaining if self._ran else None
        if self.total <= 0:  # issue 5: a search does not know its cell count in advance
            eta = None
        pos = f"{self._index}/{self.total}" if self.total > 0 else f"{self._index}"
        what = "resumed" if resumed else f"{fmt_duration(elapsed)}"
        tps = fmt_rate(rec.get("tokens_per_s")) if rec.get("status") == "ok" else "-"
        line = (f"[{pos}] {rec['cell_id']}: {status_text(rec)}, peak {fmt_gib(mem)} {kind}, "
                f"{tps} tokens/s ({what}; elapsed {fmt_duration(total_elapsed)}, ETA {fmt_duration(eta)})")
        if rec.get("scaling_efficiency") is not None:  # issue 8
            line += f"\n    scaling efficiency {rec['scaling_efficiency']:.0%} vs {rec['scaling_baseline_cell']}"
        if rec.get("status") not in ("ok", "oom") and rec.get("error"):
            line += f"\n    {str(rec['error']).splitlines()[0][:300]}"
        if rec.get("nonfinite_message"):  # a NaN loss is never silent
            line += f"\n    {rec['nonfinite_message'][:300]}"
        self.out(line)
