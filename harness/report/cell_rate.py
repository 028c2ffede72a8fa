"""Cells per hour of a run folder. Pure module: run.json and records in, numbers
and lines out; no pandas, no torch.

A sweep run with ``--gpus`` writes what it measured into its invocation in ``run.json``
(``throughput``: the GPUs, cells run, the wall time from the first cell handed out to the
last one finished, cells per hour, and the worker servers' start time, which is not
counted). For other runs the figure is estimated from the records: cells that ran over
the span from the first one's start (its timestamp minus its wall time) to the last one's
end; timestamps have one-second resolution, so the estimate is rough for short runs.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

TS_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def measured(run_json: dict[str, Any]) -> list[dict[str, Any]]:
    """The throughput entries of every invocation that recorded one, in order."""
    return [dict(i["throughput"], command=i.get("command")) for i in run_json.get("invocations", [])
            if isinstance(i, dict) and isinstance(i.get("throughput"), dict)]


def _ts(value: Any) -> float | None:
    try:
        return datetime.strptime(str(value), TS_FORMAT).timestamp()
    except (TypeError, ValueError):
        return None


def estimate(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """Cells per hour from the records of cells that ran (None without any)."""
    spans = []
    for r in records:
        if not r.get("log") or r.get("resumed"):
            continue
        end, wall = _ts(r.get("timestamp")), r.get("wall_time_s")
        if end is None or not isinstance(wall, (int, float)):
            continue
        spans.append((end - float(wall), end))
    if not spans:
        return None
    wall_s = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"cells_run": len(spans), "cells_wall_s": round(wall_s, 1),
            "cells_per_hour": round(len(spans) * 3600.0 / wall_s, 2) if wall_s > 0 else None, "estimated": True}


def of_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's throughput: the last measured invocation, else the estimate."""
    d = Path(run_dir)
    try:
        meta = json.loads((d / "run.json").read_text())
    except (OSError, ValueError):
        meta = {}
    entries = measured(meta)
    if entries:
        return entries[-1]
    from harness.core.store import read_records

    path = d / "results.jsonl"
    return estimate(read_records(path)[0]) if path.is_file() else None


def of_runs(run_dirs: Iterable[str | Path]) -> dict[str, Any] | None:
    """Several run folders read as one (the shards of a sweep, hosts side by side): the
    estimate over all their records, from the first cell's start to the last one's end
    (hosts' clocks are assumed to agree to a second or so). One folder: ``of_run``."""
    from harness.core.store import read_records

    dirs = [Path(d) for d in run_dirs]
    if len(dirs) == 1:
        return of_run(dirs[0])
    records = [r for d in dirs if (d / "results.jsonl").is_file() for r in read_records(d / "results.jsonl")[0]]
    t = estimate(records)
    return dict(t, runs=len(dirs)) if t else None


def line(t: dict[str, Any] | None) -> str:
    if not t or not t.get("cells_per_hour"):
        return "throughput: not measured (no cell ran)"
    gpus = t.get("gpus")
    where = f" on {len(gpus)} GPU(s) ({','.join(str(g) for g in gpus)})" if gpus else ""
    where += f" over {t['runs']} run folders" if t.get("runs") else ""
    how = " (estimated from record timestamps)" if t.get("estimated") else ""
    start = f"; worker servers started in {t['worker_start_s']:.0f} s, not counted" if t.get("worker_start_s") else ""
    return (f"throughput: {t['cells_run']} cells in {t['cells_wall_s']:.0f} s{where}: "
            f"{t['cells_per_hour']:,.0f} cells/hour{how}{start}")


def describe(run_dir: str | Path) -> list[str]:
    return ["", line(of_run(run_dir))]
