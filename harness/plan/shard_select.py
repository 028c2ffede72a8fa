"""``--shard`` and ``--shard-history`` applied to a sweep's cells: the I/O half of
``harness.plan.shard`` (the scheduler's environment, earlier runs' records, the default
run folder). No torch.

It runs inside ``harness.plan.options.build_config`` so that ``lora-harness run``,
``lora-harness cells`` and ``pytest suites/`` select the same cells from the same options.
"""

from __future__ import annotations

import glob as globmod
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.core.errors import SpecError
from harness.core.spec import CellSpec
from harness.core.store import DEFAULT_BASE, load_records, new_run_id
from harness.plan.matrix import split_list
from harness.plan.shard import ShardPlan, parse_shard, split
from harness.plan.shard_cost import History, estimator


def history_folders(raw: str | None) -> list[Path]:
    """``--shard-history`` -> run folders: folders, quoted globs, folders of run folders."""
    out: list[Path] = []
    for item in split_list(raw):
        if not os.path.exists(item) and globmod.has_magic(item):
            found = [Path(m) for m in sorted(globmod.glob(item)) if Path(m, "results.jsonl").is_file()]
            if not found:
                raise SpecError(f"--shard-history: {item} matches no run folder")
            out += found
            continue
        p = Path(item)
        if (p / "results.jsonl").is_file():
            out.append(p)
        elif p.is_dir() and any((c / "results.jsonl").is_file() for c in p.iterdir()):
            out += sorted(c for c in p.iterdir() if (c / "results.jsonl").is_file())
        else:
            raise SpecError(f"--shard-history: {item} is not a run folder (no results.jsonl) nor a folder of them")
    return out


def load_history(raw: str | None) -> History | None:
    folders = history_folders(raw)
    if not folders:
        return None
    records: list[dict[str, Any]] = []
    for d in folders:
        records += load_records(d / "results.jsonl")
    return History(records)


def select(cells: Sequence[CellSpec], raw_shard: str | None, raw_history: str | None,
           env: Mapping[str, str] | None = None) -> ShardPlan | None:
    """The shard plan of the options (None without ``--shard``)."""
    spec = parse_shard(raw_shard, os.environ if env is None else env)
    if spec is None:
        if raw_history:
            raise SpecError("--shard-history only applies with --shard")
        return None
    history = load_history(raw_history)
    cost, basis = estimator(list(cells), history)
    return ShardPlan(spec, split(cells, spec.count, cost, basis=basis))


def default_run_dir(plan: ShardPlan, *, resume: bool, base: str | os.PathLike = DEFAULT_BASE) -> str:
    """A shard's run folder when ``--run-dir`` is not given: ``<time>-<host>-shardKofN``,
    so shards started in the same second on one host (or on hosts of the same name)
    never share a folder. ``--resume`` continues the latest folder of the same shard."""
    suffix = "-" + plan.spec.suffix
    if not resume:
        return str(Path(base) / (new_run_id() + suffix))
    base = Path(base)
    runs = sorted((p for p in base.glob(f"*{suffix}") if (p / "results.jsonl").exists()),
                  key=lambda p: p.stat().st_mtime) if base.is_dir() else []
    if not runs:
        raise SpecError(f"--resume: no earlier run folder of shard {plan.spec.label} (*{suffix}) under {base}; "
                        "give --run-dir")
    return str(runs[-1])
