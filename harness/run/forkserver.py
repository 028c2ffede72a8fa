"""Parent side of cell isolation: runs jobs through the fork server, with a timeout, and
classifies how each ended. Imports no torch.

Outcome classification (``classify``):
- the child wrote a result  -> the status it wrote (ok / oom / unsupported / error);
- killed by the runner after the time limit -> ``timeout``;
- killed by a signal (segfault in a native library, abort, the kernel's OOM killer) ->
  ``crash`` with the signal's name and the end of the cell's log;
- exited without a result -> ``crash``.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.record import Status
from harness.core.host import import_root


class RunnerError(RuntimeError):
    """The fork server could not be started or stopped answering."""


@dataclass
class JobOutcome:
    job_id: str
    result: dict[str, Any] | None
    returncode: int | None
    signal: int | None
    timed_out: bool
    wall_s: float
    log_path: str
    pid: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # time.monotonic() when the job was sent and when its exit was seen (the phase timers)
    t_submit: float | None = None
    t_exit: float | None = None


def _log_tail(path: str, n: int = 6) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4000))
            lines = f.read().decode(errors="replace").splitlines()
        return " | ".join(line.strip() for line in lines[-n:] if line.strip())
    except OSError:
        return ""


def _stuck_at(path: str) -> str | None:
    """The innermost frame of the main thread in the stack dump that a job writes to its log
    when it is stopped at its limit (SIGUSR1, faulthandler), or None without a dump."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64000))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if line.startswith("Current thread ")]
    if not starts:
        return None
    frames = [line.strip() for line in lines[starts[-1] + 1:] if line.strip().startswith("File ")]
    return frames[0] if frames else None


def classify(out: JobOutcome, timeout_s: float) -> dict[str, Any]:
    """The worker half of a record for a job, however it ended (a cell's clock readings
    are left for its launcher: ``harness.run.launch.ForkLauncher``)."""
    if out.timed_out:
        where = _stuck_at(out.log_path)
        return {"status": Status.TIMEOUT.value,
                "error": f"killed after the cell's {timeout_s:g} s limit; "
                         + (f"stuck at {where}" if where else f"log ends: {_log_tail(out.log_path, 3)}")}
    if out.result is not None:
        return dict(out.result)
    if out.signal is not None:
        try:
            name = signal.Signals(out.signal).name
        except ValueError:
            name = f"signal {out.signal}"
        hint = " (possibly the kernel's out-of-memory killer)" if out.signal == signal.SIGKILL else ""
        return {"status": Status.CRASH.value,
                "error": f"worker killed by {name}{hint}; log ends: {_log_tail(out.log_path)}"}
    return {"status": Status.CRASH.value,
            "error": f"worker exited with code {out.returncode} without a result; log ends: {_log_tail(out.log_path)}"}


class ForkServerRunner:
    """Starts ``python -m harness.cell.server --server`` once and runs jobs through it."""

    def __init__(self, work_dir: str | os.PathLike, *, python: str | None = None, env: dict[str, str] | None = None,
                 start_timeout_s: float = 600.0, mode: str | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        self.env = dict(os.environ)
        # The worker must import this harness, installed or not (the H200 host runs it
        # from the working tree).
        root = import_root()
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self.env.get("PYTHONPATH", "")) if p)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if mode:
            self.env["LORA_HARNESS_WORKER_MODE"] = mode
        self.env.update(env or {})
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready: dict[str, Any] | None = None
        self._events: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._ready_q: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._reader: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        if self.proc is not None:
            return self.ready or {}
        log = open(self.work_dir / "forkserver.log", "ab")
        self.proc = subprocess.Popen([self.python, "-m", "harness.cell.server", "--server"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, env=self.env, cwd=os.getcwd())
        log.close()
        self._reader = threading.Thread(target=self._read_events, name="forkserver-reader", daemon=True)
        self._reader.start()
        try:
            self.ready = self._ready_q.get(timeout=self.start_timeout_s)
        except queue.Empty:
            self.close()
            raise RunnerError(f"the worker server did not start within {self.start_timeout_s:g} s "
                              f"(see {self.work_dir / 'forkserver.log'})") from None
        if self.ready.get("event") != "ready":
            self.close()
            raise RunnerError(f"the worker server failed to start: {_log_tail(str(self.work_dir / 'forkserver.log'))}")
        return self.ready

    def _read_events(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if ev.get("event") == "ready":
                self._ready_q.put(ev)
                continue
            with self._lock:
                q = self._events.setdefault(ev.get("job_id", ""), queue.Queue())
            q.put(ev)
        # server gone: wake every waiter
        self._ready_q.put({"event": "eof"})
        with self._lock:
            for q in self._events.values():
                q.put({"event": "eof"})

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.write(b'{"cmd": "shutdown"}\n')
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "ForkServerRunner":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- jobs ----------------------------------------------------------------------
    def run_job(self, target: str, args: dict[str, Any], *, timeout_s: float, log_path: str | os.PathLike,
                result_path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> JobOutcome:
        """Run ``target(**args)`` in a fresh child; never raises for what the job does."""
        if not self.alive:
            self.proc = None
            self.start()
        job_id = f"j{next(self._ids)}-{os.getpid()}"
        result_path = str(result_path or (self.work_dir / f"{job_id}.result.json"))
        for stale in (result_path,):
            if os.path.exists(stale):
                os.remove(stale)
        job = {"job_id": job_id, "target": target, "args": args, "result_path": result_path,
               "log_path": str(log_path), "env": env or {}}
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._events[job_id] = q
        t0 = time.monotonic()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": "run", "job": job}) + "\n").encode())
        self.proc.stdin.flush()
        pid = None
        timed_out = False
        exited: dict[str, Any] | None = None
        deadline = t0 + timeout_s
        while exited is None:
            wait = deadline - time.monotonic() if not timed_out else 60.0
            try:
                ev = q.get(timeout=max(0.01, wait))
            except queue.Empty:
                if timed_out:  # even SIGKILL did not end it: give up on this job
                    exited = {"returncode": None, "signal": None}
                    break
                timed_out = True
                if pid is not None:
                    _dump_stack(pid)
                    _kill_group(pid)
                continue
            if ev["event"] == "started":
                pid = ev["pid"]
                if timed_out:
                    _kill_group(pid)
            elif ev["event"] == "exited":
                exited = ev
            elif ev["event"] == "eof":
                exited = {"returncode": None, "signal": None, "server_died": True}
        wall = time.monotonic() - t0
        with self._lock:
            self._events.pop(job_id, None)
        result = None
        if os.path.exists(result_path):
            try:
                with open(result_path) as f:
                    result = json.load(f)
            except ValueError:
                result = None
            os.remove(result_path)  # its content goes into the record
        out = JobOutcome(job_id, result, exited.get("returncode"), exited.get("signal"), timed_out and result is None,
                         wall, str(log_path), pid, t_submit=t0, t_exit=t0 + wall)
        if exited.get("server_died"):
            out.extra["server_died"] = True
        return out


def _dump_stack(pid: int, wait_s: float = 2.0) -> None:
    """Ask a job at its limit where it is (its faulthandler writes every thread's stack to
    the job's log on SIGUSR1), so that a hang is recorded with the line it hung on. Only the
    job's own process: others in its group have no handler and SIGUSR1 would end them."""
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return
    time.sleep(wait_s)


def _kill_group(pid: int) -> None:
    """Kill the job's process group (the child called setsid: its group id is its pid)."""
    for fn in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            fn()
            return
        except OSError:
            continue
