"""Splitting a sweep into N shards that separate processes run without talking to each
other (a SLURM job array, a Kubernetes Indexed Job, a CI matrix). Pure module.

``--shard K/N`` runs shard K of N, K counting from 1 (``1/4`` ... ``4/4``). Schedulers
count their tasks from 0: ``--shard auto`` takes the index from SLURM_ARRAY_TASK_ID (and
the count from SLURM_ARRAY_TASK_COUNT) or JOB_COMPLETION_INDEX (Kubernetes; the count is
the job's ``completions``, given as ``--shard auto/N``) and adds 1.

The split:

- **Rows stay whole.** Cells equal but for sequence length (``harness.plan.prune.row_key``)
  go to one shard, where they run short to long as in a serial sweep; a shorter cell's
  out-of-memory therefore prunes the longer ones exactly as it would serially. A
  torchrun cell's row goes with its one-GPU row too (``group_key``): its scaling
  efficiency is computed against the one-GPU cell recorded in the same run folder.
- **Balanced by predicted time.** Greedy longest-processing-time: rows sorted by their
  estimate (descending), then by their id; each goes to the shard with the least
  predicted time so far, the lowest-numbered on a tie. The largest shard's estimate is
  at most the average plus the largest group's (row's) estimate.
- **Deterministic.** The split depends only on the set of cells, N and the estimates,
  not on the order the cells come in, so every shard process computes the same split.
  Within a shard, cells keep the sweep's order.

The fingerprint (a hash of every selected cell id and N) tells shards of the same sweep
apart from others; the split digest (a hash of the assignment) tells whether they also
split it the same way (same estimates).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from harness.core.errors import SpecError
from harness.core.spec import CellSpec
from harness.plan.prune import row_key

USAGE = "expected K/N with 1 <= K <= N (e.g. 2/4; shards count from 1), auto or auto/N"


@dataclass(frozen=True)
class ShardSpec:
    """Which shard this process runs: ``index`` of ``count``, 1-based."""

    index: int
    count: int
    source: str = "--shard"  # where the index came from, e.g. "SLURM_ARRAY_TASK_ID=1"

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def suffix(self) -> str:
        """The run id's ending: run folders of different shards never collide."""
        return f"shard{self.index}of{self.count}"


def parse_shard(raw: str | None, env: Mapping[str, str]) -> ShardSpec | None:
    """``--shard`` -> ShardSpec (None when not given). ``env`` is consulted for ``auto``."""
    if raw is None or not str(raw).strip():
        return None
    text = str(raw).strip().lower()
    m = re.fullmatch(r"(auto|\d+)(?:/(\d+))?", text)
    if not m or (m.group(1) != "auto" and m.group(2) is None):
        raise SpecError(f"--shard {raw}: {USAGE}")
    count = int(m.group(2)) if m.group(2) is not None else None
    if count is not None and count < 1:
        raise SpecError(f"--shard {raw}: N must be at least 1")
    if m.group(1) == "auto":
        return _from_env(env, count, raw)
    index = int(m.group(1))
    if not 1 <= index <= count:
        raise SpecError(f"--shard {raw}: K must be between 1 and {count} (shards count from 1)")
    return ShardSpec(index, count)


def _int_env(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SpecError(f"--shard auto: {name}={value!r} is not a whole number") from None


def _from_env(env: Mapping[str, str], count: int | None, raw: str) -> ShardSpec:
    """The scheduler's 0-based task index -> a 1-based shard."""
    if env.get("SLURM_ARRAY_TASK_ID"):
        task = _int_env(env, "SLURM_ARRAY_TASK_ID")
        lo = _int_env(env, "SLURM_ARRAY_TASK_MIN", 0)
        step = _int_env(env, "SLURM_ARRAY_TASK_STEP", 1) or 1
        n_env = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        if count is not None and n_env is not None and count != n_env:
            raise SpecError(f"--shard {raw}: the SLURM array has {n_env} tasks (SLURM_ARRAY_TASK_COUNT)")
        count = count if count is not None else n_env
        if count is None:
            raise SpecError(f"--shard {raw}: SLURM_ARRAY_TASK_COUNT is not set; give the count as --shard auto/N")
        if (task - lo) % step:
            raise SpecError(f"--shard {raw}: task {task} is not on the array's step {step} from {lo}")
        zero_based, source = (task - lo) // step, f"SLURM_ARRAY_TASK_ID={task}"
    elif env.get("JOB_COMPLETION_INDEX"):
        zero_based, source = _int_env(env, "JOB_COMPLETION_INDEX"), f"JOB_COMPLETION_INDEX={env['JOB_COMPLETION_INDEX']}"
        if count is None:
            raise SpecError(f"--shard {raw}: JOB_COMPLETION_INDEX gives the index only; pass the Job's "
                            "completions as --shard auto/N")
    else:
        raise SpecError(f"--shard {raw}: no scheduler index in the environment (SLURM_ARRAY_TASK_ID, "
                        "JOB_COMPLETION_INDEX); give --shard K/N")
    if not 0 <= zero_based < count:
        raise SpecError(f"--shard {raw}: {source} is task {zero_based} (from 0), outside 0..{count - 1}")
    return ShardSpec(zero_based + 1, count, source)


@dataclass(frozen=True)
class Split:
    """Every cell's shard. ``shards[k - 1]`` holds shard k's cells in the sweep's order."""

    count: int
    shards: tuple[tuple[CellSpec, ...], ...]
    estimates: tuple[float, ...]  # predicted time per shard (seconds, or token units)
    fingerprint: str
    digest: str
    basis: str = ""


def fingerprint(cell_ids: Iterable[str], count: int) -> str:
    """Of the sweep (its cells) and N: shards with the same one split the same sweep."""
    text = "\n".join(sorted(set(cell_ids))) + f"\n#shards={count}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_digest(assignment: Mapping[str, int]) -> str:
    text = "\n".join(f"{cid}\t{k}" for cid, k in sorted(assignment.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def group_key(cell: CellSpec) -> CellSpec:
    """What must share a shard: the cell's row, and the one-GPU row of a torchrun cell."""
    return dataclasses.replace(row_key(cell), world_size=1, parallel=None)


def split(cells: Sequence[CellSpec], count: int, estimate: Callable[[CellSpec], float], *,
          basis: str = "") -> Split:
    """Groups of rows -> shards by greedy longest-processing-time on ``estimate`` (see the
    module)."""
    if count < 1:
        raise SpecError("the number of shards must be at least 1")
    rows: dict[CellSpec, list[CellSpec]] = {}
    for c in cells:
        rows.setdefault(group_key(c), []).append(c)
    # sums in id order: the same floats whatever order the cells came in
    cost = {k: sum(estimate(c) for c in sorted(v, key=lambda c: c.cell_id)) for k, v in rows.items()}
    order = sorted(rows, key=lambda k: (-cost[k], k.cell_id, repr(k)))
    loads = [0.0] * count
    assignment: dict[str, int] = {}
    for k in order:
        target = min(range(count), key=lambda j: (loads[j], j))
        loads[target] += cost[k]
        for c in rows[k]:
            assignment[c.cell_id] = target + 1
    shards = tuple(tuple(c for c in cells if assignment[c.cell_id] == k) for k in range(1, count + 1))
    return Split(count=count, shards=shards, estimates=tuple(loads),
                 fingerprint=fingerprint((c.cell_id for c in cells), count), digest=split_digest(assignment),
                 basis=basis)


@dataclass(frozen=True)
class ShardPlan:
    """This process's shard and the whole split (every shard's run.json holds it, so a
    completeness check knows the cells of a shard whose folder never arrived)."""

    spec: ShardSpec
    split: Split

    @property
    def cells(self) -> tuple[CellSpec, ...]:
        return self.split.shards[self.spec.index - 1]

    @property
    def total(self) -> int:
        return sum(len(s) for s in self.split.shards)

    def to_json(self) -> dict[str, Any]:
        """run.json's ``shard`` entry (read by ``lora-harness shards``)."""
        return {"index": self.spec.index, "count": self.spec.count, "label": self.spec.label,
                "source": self.spec.source, "fingerprint": self.split.fingerprint, "split_digest": self.split.digest,
                "basis": self.split.basis, "cells_total": self.total,
                "estimates": [round(e, 3) for e in self.split.estimates],
                "split": [[c.cell_id for c in s] for s in self.split.shards]}

    def describe(self) -> str:
        """One line for the console: which shard, of how many cells, balanced how."""
        n = len(self.cells)
        head = f"shard {self.spec.label}"
        if self.spec.source != "--shard":
            head += f" ({self.spec.source})"
        if not n:
            return (f"{head}: no cells (the split of {self.total} cells gave this shard none); nothing to run "
                    f"[sweep {self.split.fingerprint}]")
        return (f"{head}: {n} of {self.total} cells, balanced by {self.split.basis or 'estimate'} "
                f"[sweep {self.split.fingerprint}]")
