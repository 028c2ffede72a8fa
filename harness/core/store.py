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
import secrets
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
    """``20261205-120142-host-3f9a0c``: readable, sorted by time, and unique even for runs
    started in the same second on the same host (the random part; the folder is also
    created exclusively, so a clash is retried, never shared)."""
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{host}-{secrets.token_hex(3)}"


def _new_run_dir(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = base / new_run_id()
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise StoreError(f"cannot create a new run folder under {base}")


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
        return cls(_new_run_dir(Path(base)))

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


class RunLock:
    """One writer per run folder: an exclusive lock on ``<run>/.lock`` held for a whole
    sweep. A second sweep on the same folder stops at once with a line naming the holder
    (pid, host, command, since when). The kernel drops the lock when its process dies, so
    a killed sweep never leaves the folder locked. (``flock`` is local to one machine: on
    a network file system give each host its own run folder, as docs/multi-host.md says.)
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self, command: str = "") -> "RunLock":
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise StoreError(f"{self.path.parent} is in use by another sweep ({holder}); wait for it to finish "
                             "or give another --run-dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return "holder unknown"
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
                + (f": {info['command'][:120]}" if info.get("command") else ""))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_records(path: str | os.PathLike, *, upgrade: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a results file and one line per problem met reading it: a line that
    is not JSON (a run killed mid-write), a line that is JSON but not a record, a field of
    the wrong type (read as blank), records a newer harness wrote (kept, read as they
    are). Each record is read as today's schema (``schema.upgrade``); ``upgrade=False``
    yields the lines exactly as stored. Nothing is dropped without a line saying so."""
    with open(path, "r", errors="replace") as f:
        lines = f.read().split("\n")
    records, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            problems.append(f"{path}: line {n} is not valid JSON (a run killed mid-write?); skipped")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{path}: line {n} is JSON but not a record (a {type(rec).__name__}); skipped")
            continue
        if upgrade:
            rec, bad = schema.check_types(rec)
            problems += [f"{path}: line {n} ({rec.get('cell_id') or 'no cell id'}): {b}" for b in bad]
        records.append(rec)
    if upgrade:
        newer = schema.newer_versions(records)
        if newer:
            problems.append(schema.newer_note(str(path), newer))
        records = [schema.upgrade(r) for r in records]
    return records, problems


def iter_records(path: str | os.PathLike, *, upgrade: bool = True) -> Iterator[dict[str, Any]]:
    """``read_records``'s records; each problem is a ``UserWarning`` (the CLI prints them
    as one line each, ``report`` lists them)."""
    records, problems = read_records(path, upgrade=upgrade)
    for p in problems:
        warnings.warn(p, stacklevel=2)
    yield from records


def load_records(path: str | os.PathLike, *, upgrade: bool = True) -> list[dict[str, Any]]:
    return list(iter_records(path, upgrade=upgrade))
