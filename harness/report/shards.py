"""Do shard run folders form a complete sweep? (``lora-harness shards``). No pandas, no torch.

Each shard run (``--shard K/N``) writes its part of the split into ``run.json`` (``shard``:
K, N, the sweep's fingerprint, the split digest and every shard's cell ids), so the
check needs nothing but the folders: which shards are there, which are missing, which
cells no folder recorded (a missing shard's, a shard stopped by --time-limit or killed),
which cells two folders recorded (a shard run twice, or folders of different splits),
and whether all came from the same split. Complete: one sweep, every cell recorded.
"""

from __future__ import annotations

import glob as globmod
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness.core.store import StoreError, load_records


class ShardCheckError(StoreError):
    """Input the check cannot use at all (a path that does not exist, no run folder)."""


@dataclass(frozen=True)
class ShardRun:
    path: str
    shard: dict[str, Any] | None  # run.json's "shard" entry (None: not a shard run)
    statuses: dict[str, str]  # cell id -> the status of its last record


def _is_run(p: Path) -> bool:
    return (p / "run.json").is_file() or (p / "results.jsonl").is_file()


def find_runs(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Run folders from folders, folders of run folders and quoted globs (as the report
    reads them); a shard that started but recorded nothing yet has run.json only, and
    still counts as present."""
    out: list[Path] = []
    notes: list[str] = []
    for item in paths:
        text = str(item)
        if not os.path.exists(text) and globmod.has_magic(text):
            matches = [Path(m) for m in sorted(globmod.glob(text))]
            runs = [m for m in matches if _is_run(m)]
            if not runs:
                raise ShardCheckError(f"{text}: matches no run folder")
            out += runs
            continue
        p = Path(text)
        if not p.exists():
            raise ShardCheckError(f"{p}: no such run folder")
        if _is_run(p):
            out.append(p)
        elif p.is_dir() and any(_is_run(c) for c in p.iterdir()):
            out += sorted(c for c in p.iterdir() if _is_run(c))
        else:
            raise ShardCheckError(f"{p} is not a run folder (no run.json or results.jsonl) nor a folder of them")
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)
        if key in seen:
            notes.append(f"{p} given twice; read once")
            continue
        seen.add(key)
        unique.append(p)
    return unique, notes


def read_run(path: Path) -> ShardRun:
    try:
        meta = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    except (OSError, ValueError):
        meta = {}
    shard = meta.get("shard") if isinstance(meta.get("shard"), dict) else None
    results = path / "results.jsonl"
    recs = load_records(results) if results.is_file() else []
    return ShardRun(str(path), shard, {r["cell_id"]: str(r.get("status")) for r in recs if r.get("cell_id")})


@dataclass
class Verdict:
    complete: bool = False
    fingerprint: str | None = None
    count: int = 0
    basis: str = ""
    total: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)  # one per shard index, 1..N
    missing: list[tuple[str, int]] = field(default_factory=list)  # (cell id, its shard)
    duplicated: dict[str, list[str]] = field(default_factory=dict)  # cell id -> folders
    extra: list[tuple[str, str]] = field(default_factory=list)  # (cell id, folder): not in the split
    other_sweeps: dict[str, list[str]] = field(default_factory=dict)  # fingerprint -> folders
    notes: list[str] = field(default_factory=list)


def check(runs: Sequence[ShardRun], *, strict: bool = False) -> Verdict:
    """The verdict over shard runs; ``strict``: a cell recorded twice is incomplete too."""
    v = Verdict()
    shard_runs = [r for r in runs if r.shard and r.shard.get("fingerprint") and r.shard.get("split")]
    v.notes += [f"{r.path}: not a shard run (no shard in run.json); left out" for r in runs if r not in shard_runs]
    if not shard_runs:
        v.notes.append("no shard run folder given (run with --shard K/N)")
        return v
    counts = Counter(r.shard["fingerprint"] for r in shard_runs)
    # the sweep most folders belong to is the reference; the others are listed, not judged
    v.fingerprint = sorted(counts, key=lambda f: (-counts[f], f))[0]
    mine = [r for r in shard_runs if r.shard["fingerprint"] == v.fingerprint]
    for r in shard_runs:
        if r.shard["fingerprint"] != v.fingerprint:
            v.other_sweeps.setdefault(r.shard["fingerprint"], []).append(r.path)
    ref = mine[0].shard
    v.count, v.basis = int(ref["count"]), str(ref.get("basis") or "")
    split = [list(s) for s in ref["split"]]
    owner = {cid: k for k, cells in enumerate(split, 1) for cid in cells}
    v.total = len(owner)
    if len({r.shard.get("split_digest") for r in mine}) > 1:
        v.notes.append("the shards split the same cells differently (different --shard-history or harness "
                       "versions?): cells are judged by id, shards by the first folder's split")
    recorded_by: dict[str, list[str]] = {}
    for r in mine:
        for cid in r.statuses:
            recorded_by.setdefault(cid, []).append(r.path)
            if cid not in owner:
                v.extra.append((cid, r.path))
    v.missing = [(cid, owner[cid]) for cells in split for cid in cells if cid not in recorded_by]
    v.duplicated = {cid: paths for cid, paths in recorded_by.items() if len(paths) > 1}
    v.shards = [_shard_entry(k, split[k - 1], [r for r in mine if int(r.shard["index"]) == k], recorded_by)
                for k in range(1, v.count + 1)]
    v.complete = not v.missing and not v.other_sweeps and not (strict and v.duplicated)
    return v


def _shard_entry(k: int, cells: list[str], folders: list[ShardRun], recorded_by: dict[str, list[str]]) -> dict:
    mine = set(cells)
    statuses: Counter = Counter()
    for r in folders:
        statuses.update(s for cid, s in r.statuses.items() if cid in mine)
    got = sum(1 for c in cells if c in recorded_by)
    state = ("empty" if not cells else "missing" if not folders else "complete" if got == len(cells)
             else "incomplete")
    return {"index": k, "state": state, "cells": len(cells), "recorded": got, "folders": [r.path for r in folders],
            "statuses": dict(statuses)}


def lines(v: Verdict) -> list[str]:
    """The verdict for a console, the last line saying complete or incomplete."""
    out = [f"note: {n}" for n in v.notes]
    if v.fingerprint is None:
        return out + ["INCOMPLETE: no shard run to check"]
    out.append(f"sweep {v.fingerprint}: {v.count} shard(s), {v.total} cells"
               + (f", balanced by {v.basis}" if v.basis else ""))
    for s in v.shards:
        head = f"  shard {s['index']}/{v.count}: "
        if s["state"] == "empty":
            out.append(head + "no cells by the split (nothing to run)")
        elif s["state"] == "missing":
            out.append(head + f"MISSING ({s['cells']} cells; no run folder)")
        else:
            st = ", ".join(f"{n} {k}" for k, n in sorted(s["statuses"].items()))
            out.append(head + f"{s['state']}, {s['recorded']} of {s['cells']} cells" + (f" ({st})" if st else "")
                       + "  " + ", ".join(s["folders"]))
    for fp, paths in v.other_sweeps.items():
        out.append(f"  another sweep {fp} (other cells or N; not judged): {', '.join(paths)}")
    if v.missing:
        out.append(f"missing cells ({len(v.missing)}):")
        out += [f"  {cid}  (shard {k}/{v.count})" for cid, k in v.missing]
    if v.duplicated:
        out.append(f"duplicated cells ({len(v.duplicated)}; every record is read, the report shows the newest):")
        out += [f"  {cid}  in {', '.join(paths)}" for cid, paths in sorted(v.duplicated.items())]
    if v.extra:
        out.append(f"cells outside the split ({len(v.extra)}; recorded, not expected):")
        out += [f"  {cid}  in {path}" for cid, path in v.extra]
    return out + [_summary(v)]


def _summary(v: Verdict) -> str:
    present = sum(1 for s in v.shards if s["state"] in ("complete", "incomplete"))
    needed = sum(1 for s in v.shards if s["state"] != "empty")
    done = v.total - len(v.missing)
    if v.complete:
        return f"COMPLETE: {present} of {needed} shard(s) with cells, {done} of {v.total} cells recorded"
    why = []
    if needed - present:
        why.append(f"{needed - present} of {needed} shard(s) missing")
    if v.missing:
        why.append(f"{len(v.missing)} of {v.total} cells not recorded")
    if v.other_sweeps:
        why.append(f"folders of {len(v.other_sweeps) + 1} different sweeps")
    if v.duplicated and not why:
        why.append(f"{len(v.duplicated)} cells recorded twice (--strict)")
    return "INCOMPLETE: " + "; ".join(why)


def to_json(v: Verdict) -> dict[str, Any]:
    return {"complete": v.complete, "fingerprint": v.fingerprint, "count": v.count, "cells_total": v.total,
            "basis": v.basis, "shards": v.shards, "missing": [{"cell_id": c, "shard": k} for c, k in v.missing],
            "duplicated": v.duplicated, "outside_split": [{"cell_id": c, "folder": p} for c, p in v.extra],
            "other_sweeps": v.other_sweeps, "notes": v.notes}
