"""Cell outcomes and the result record.

Pure module. ``Status`` is the one vocabulary of outcomes; ``outcome_for`` is the one
place that maps a status to a test outcome, so a cell that did not run can never pass.
The record's fields are declared in ``harness.core.schema``; ``RECORD_FIELDS`` (the ones
every record carries) and ``upgrade`` (reading older records) come from there.
"""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import dataclass
from typing import Any

from harness.core import schema
from harness.core.schema import SCHEMA_VERSION, upgrade  # noqa: F401 - the record's API


class Status(str, enum.Enum):
    OK = "ok"  # ran every step, proofs held
    OOM = "oom"  # ran out of memory: a measurement, not a bug
    UNSUPPORTED = "unsupported"  # cannot run on this host (reason recorded); never ran
    ERROR = "error"  # raised, or a precision / checkpointing proof failed
    CRASH = "crash"  # the worker died (signal, or exit without a result)
    TIMEOUT = "timeout"  # killed after the cell's time limit

    def __str__(self) -> str:
        return self.value


def __getattr__(name: str) -> Any:
    # Read from the schema on each access, so a field declared later (a test's) counts.
    if name == "RECORD_FIELDS":
        return schema.record_fields()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_OOM_MARKERS = (
    "out of memory",
    "outofmemoryerror",
    "cublas_status_alloc_failed",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
    "memoryerror",
)


def is_oom_message(text: str) -> bool:
    """Whether an exception text says memory ran out (CUDA, cuBLAS, CPU allocator)."""
    t = text.lower()
    return any(m in t for m in _OOM_MARKERS)


@dataclass(frozen=True)
class Outcome:
    """What a test runner should do with a cell: 'pass', 'fail', 'skip' or 'xfail'."""

    action: str
    message: str


def outcome_for(record: dict[str, Any], *, fail_on_oom: bool = False) -> Outcome:
    """The single mapping from a result to a test outcome.

    ok -> pass; oom -> xfail (a measurement: the cell ran until memory ran out; shown as
    OOM, never as passed) or fail with ``fail_on_oom``; unsupported -> skip with the
    reason; error / crash / timeout (and anything unknown) -> fail.
    """
    status = record.get("status")
    cid = record.get("cell_id", "?")
    err = record.get("error") or ""
    if status == Status.OK:
        return Outcome("pass", f"{cid}: ok")
    if status == Status.OOM:
        msg = f"{cid}: out of memory ({err.splitlines()[0][:200] if err else 'no detail'})"
        return Outcome("fail" if fail_on_oom else "xfail", "OOM: " + msg)
    if status == Status.UNSUPPORTED:
        return Outcome("skip", f"unsupported on this host: {err or 'no reason given'}")
    return Outcome("fail", f"{cid}: {status}: {err or 'no detail'}")


def make_record(spec_dict: dict[str, Any], cell_id: str, run_id: str, worker: dict[str, Any],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble one results.jsonl record: the spec, then what the worker measured."""
    rec: dict[str, Any] = {f: copy.deepcopy(schema.get(f).default) for f in schema.record_fields()}
    rec.update({"schema_version": SCHEMA_VERSION, "run_id": run_id, "cell_id": cell_id})
    for k in schema.axes():
        rec[k] = spec_dict.get(k)
    rec["spec"] = spec_dict
    rec.update(worker)
    if extra:
        rec.update(extra)
    status = rec.get("status")
    if status not in {s.value for s in Status}:
        rec["status"] = Status.ERROR.value
        rec["error"] = f"worker returned an unknown status {status!r}; {rec.get('error') or ''}".strip()
    if rec["status"] == Status.OK.value and rec.get("error"):
        rec["error"] = None
    return rec


def dumps(record: dict[str, Any]) -> str:
    """One JSON line; NaN/inf (a diverged loss) become null-safe strings, never invalid JSON."""
    return json.dumps(_clean(record), sort_keys=False)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        if obj != obj:
            return "nan"
        if obj in (float("inf"), float("-inf")):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj
