"""Run folders: ``reports/runs/<run-id>/`` with ``env.json``, ``run.json`` (the command and
options), ``results.jsonl`` (one record per cell, appended as each cell ends) and
``logs/`` (each cell's output). Nothing here imports torch.

An interrupted run loses at most the line being written; ``load_records`` reads
everything before a truncated last line (with a warning) so a killed run still resumes
and reports. Every record read is upgraded to today's schema (``harness.core.schema``),
so resuming, reporting and the fit search see older records with today's defaults.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from harness.core import schema
from harness.core.record import dumps
from harness.core.spec import safe_name

DEFAULT_BASE = Path("reports") / "runs"


class StoreError(RuntimeError):
    """A run folder that cannot be created, written or read."""


def new_run_id() -> str:
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{host}"


def latest_run(base: str | os.PathLike = DEFAULT_BASE) -> Path | None:
    base = Path(base)
    if not base.is_dir():
        return None
    runs = sorted((p for p in base.iterdir() if (p / "results.jsonl").exists()), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


class RunStore:
    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        try:
            (self.dir / "logs").mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}-{threading.get_ident()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"cannot write the run folder {self.dir}: {exc.strerror or exc}") from None
        self.results_path = self.dir / "results.jsonl"
        self.run_id = self.dir.name

    @classmethod
    def open(cls, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
             base: str | os.PathLike = DEFAULT_BASE) -> "RunStore":
        """The folder given, the latest one when resuming without a folder, else a new one."""
        if run_dir:
            return cls(run_dir)
        if resume:
            last = latest_run(base)
            if last is None:
                raise StoreError(f"--resume: no earlier run under {base} (give --run-dir)")
            return cls(last)
        return cls(Path(base) / new_run_id())

    def log_path(self, cell_id: str) -> Path:
        return self.dir / "logs" / f"{safe_name(cell_id)}.log"

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
        return path

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.dir / name
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as a single write, flushed and fsynced before returning.

        Safe with several writers (threads, or processes sharing the folder): the line
        goes out in one ``os.write`` on an O_APPEND descriptor while an exclusive
        ``flock`` is held, so lines never interleave and the fresh-line check below sees
        the file as the last writer left it.
        """
        data = (dumps(record) + "\n").encode()
        fd = os.open(self.results_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A run killed mid-write leaves a partial last line; start ours on a fresh line.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    def records(self) -> list[dict[str, Any]]:
        return load_records(self.results_path) if self.results_path.exists() else []

    def latest_by_cell(self) -> dict[str, dict[str, Any]]:
        """The last record of each cell (a resumed run may have retried a cell)."""
        return {r["cell_id"]: r for r in self.records() if "cell_id" in r}


def iter_records(path: str | os.PathLike, *, upgrade: bool = True) -> Iterator[dict[str, Any]]:
    """The records of a results file, each read as today's schema (``schema.upgrade``).
    Records a newer harness wrote are kept as they are, with one warning naming the
    file and their versions; ``upgrade=False`` yields the lines exactly as stored."""
    with open(path, "r", errors="replace") as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            warnings.warn(f"{path}: line {n} is not valid JSON (a run killed mid-write?); skipped", stacklevel=2)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if upgrade:
        newer = schema.newer_versions(records)
        if newer:
            warnings.warn(schema.newer_note(str(path), newer), stacklevel=2)
        records = [schema.upgrade(r) for r in records]
    yield from records


def load_records(path: str | os.PathLike, *, upgrade: bool = True) -> list[dict[str, Any]]:
    return list(iter_records(path, upgrade=upgrade))
