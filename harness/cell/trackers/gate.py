"""A step gate: training processes that take turns, one step at a time, at a driver's word.

Why: on the H200 host the same cell's tokens/s spread 15-56% between processes run one
after another, because the host CPU wanders; a harness/bare ratio of 0.93 or 1.02 means
nothing then. When both loops are alive at once and step in turn (bare, harness,
harness, bare, ...), a slow spell of the host hits both sides of a round alike, and the
per-round ratio is steady (``benchmarks/interleaved.py`` drives it,
``benchmarks/protocol.py`` does the statistics).

Protocol: two FIFOs per side, made by the driver (:func:`make_fifos`). The driver writes
one command a line to ``<side>.go``; the side writes JSON lines to ``<side>.done``.

- the side's first :meth:`StepGate.wait_turn` opens both FIFOs (waiting, up to
  ``connect_timeout_s``, until the driver has opened its ends) and says
  ``{"event": "ready"}``;
- each later ``wait_turn`` first sends the report of the step just run
  (``{"event": "done", "step", "dt", "t0", "t1", "w0", "w1", ...}``: ``dt`` the step
  timer's figure, ``t0`` / ``t1`` ``time.monotonic()`` when the turn was granted and when
  the step ended, ``w0`` / ``w1`` the same on ``time.time()``), so a report arrives only
  when the side is idle at its gate again, its bookkeeping done;
- commands: ``go`` (run one step), ``profile`` (run one step under the GPU-busy
  profiler, :mod:`harness.cell.trackers.gpu_busy`), ``stop`` (end the measured window);
- the side's last word is ``{"event": "end", ...}`` (with the last step's report when it
  ran out of steps before a ``stop``). A driver that goes away reads as ``stop``.

Waiting at the gate happens before the step timer starts (``CellHooks.before_step``)
and the report after it stopped (``CellHooks.after_step``): the timed region is unchanged.

:class:`GatedHooks` puts a harness cell behind a gate (``opts["step_gate"] = [go, done]``,
``harness.cell.train.run_cell``); ``benchmarks/bare_lora.py --gate GO,DONE`` the bare loop.
While a harness cell waits, its NVML sampler thread is paused, so it polls during the
cell's own steps, as in a cell alone, and not during the other sides' steps.
No torch at import.
"""

from __future__ import annotations

import errno
import json
import os
import select
import time
from pathlib import Path
from typing import Any, Callable

GO, PROFILE, STOP = "go", "profile", "stop"


class GateError(RuntimeError):
    """The other end of a gate went away or did not answer in time."""


def make_fifos(folder: str | os.PathLike, name: str) -> tuple[str, str]:
    """Create ``<name>.go`` and ``<name>.done`` in ``folder``; their paths."""
    paths = (str(Path(folder) / f"{name}.go"), str(Path(folder) / f"{name}.done"))
    for p in paths:
        os.mkfifo(p)
    return paths


class StepGate:
    """The side's end of a gate."""

    def __init__(self, go_path: str, done_path: str, connect_timeout_s: float = 3600.0) -> None:
        self.go_path, self.done_path = go_path, done_path
        self.connect_timeout_s = connect_timeout_s
        self._rd = self._wr = None
        self._pending: dict[str, Any] | None = None
        self._turn = (0.0, 0.0)
        self.waited_s = 0.0  # time spent at the gate (outside every step timer)
        self.closed = False

    def _send(self, obj: dict[str, Any]) -> bool:
        try:
            self._wr.write((json.dumps(obj) + "\n").encode())
            return True
        except (BrokenPipeError, OSError, ValueError):
            self.closed = True  # the driver went away: nothing more to say
            return False

    def wait_turn(self) -> str:
        """Report the last step, then block until the driver's next command."""
        t = time.monotonic()
        if self.closed:
            return STOP
        if self._rd is None:
            ok = self._open() and self._send({"event": "ready", "pid": os.getpid()})
        else:
            ok = self._pending is None or self._send(self._pending)
            self._pending = None
        line = self._rd.readline() if ok else b""
        cmd = line.decode().strip()
        if cmd not in (GO, PROFILE, STOP):
            cmd = STOP  # end of file (the driver is gone) or a command this side does not know
        self._turn = (time.monotonic(), time.time())
        self.waited_s += self._turn[0] - t
        return cmd

    def _open(self) -> bool:
        """Open both FIFOs once the driver has opened its ends; False (the gate closed)
        if it has not within ``connect_timeout_s``, so a side never waits for a driver
        that is gone."""
        rfd = os.open(self.go_path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks; makes this side the reader
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:  # succeeds once the driver has opened both its ends (go's writer first)
                wfd = os.open(self.done_path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    os.close(rfd)
                    raise
            if time.monotonic() > deadline:
                os.close(rfd)
                self.closed = True
                return False
            time.sleep(0.01)
        os.set_blocking(rfd, True)
        os.set_blocking(wfd, True)
        self._rd, self._wr = os.fdopen(rfd, "rb", buffering=0), os.fdopen(wfd, "wb", buffering=0)
        return True

    def step_done(self, step: int, step_time: float, **extra: Any) -> None:
        """Keep the report of the step just run (sent at the next :meth:`wait_turn`)."""
        self._pending = {"event": "done", "step": step, "dt": step_time, "t0": self._turn[0],
                         "t1": time.monotonic(), "w0": self._turn[1], "w1": time.time(), **extra}

    def end(self, **summary: Any) -> None:
        """The side's last word; closes the gate."""
        if self._wr is not None and not self.closed:
            msg = {"event": "end", "pid": os.getpid(), **summary}
            if self._pending is not None:
                msg["last"] = self._pending
            self._send(msg)
        for f in (self._wr, self._rd):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self.closed = True


class DriverGate:
    """The driver's end of one side's gate."""

    def __init__(self, name: str, go_path: str, done_path: str) -> None:
        self.name, self.go_path, self.done_path = name, go_path, done_path
        self._wfd: int | None = None
        self._rfd: int | None = None
        self._buf = b""

    @property
    def connected(self) -> bool:
        return self._rfd is not None

    def try_connect(self) -> bool:
        """Open the driver's ends once the side has opened its own (never blocks)."""
        if self._rfd is not None:
            return True
        try:
            wfd = os.open(self.go_path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # the side has not opened its end yet
                return False
            raise
        os.set_blocking(wfd, True)
        self._wfd = wfd
        # never blocks; stays silent (not at end of file) until the side's writer has come and gone
        self._rfd = os.open(self.done_path, os.O_RDONLY | os.O_NONBLOCK)
        return True

    def send(self, cmd: str) -> None:
        try:
            os.write(self._wfd, (cmd + "\n").encode())
        except (BrokenPipeError, OSError) as exc:
            raise GateError(f"{self.name}: the side's gate is closed ({exc})") from None

    def recv(self, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> dict[str, Any]:
        """The side's next message; GateError if it ends or stays silent ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GateError(f"{self.name}: no word from the side in {timeout_s:g} s")
            ready, _, _ = select.select([self._rfd], [], [], min(0.5, left))
            if not ready:
                if not alive():
                    raise GateError(f"{self.name}: the side ended without a word")
                continue
            data = os.read(self._rfd, 65536)
            if not data:
                raise GateError(f"{self.name}: the side closed its gate")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        for fd in (self._wfd, self._rfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wfd = self._rfd = None


def _pause_sampler(sampler) -> bool:
    """Stop a MemorySampler's polling thread (the figures it gathered stay)."""
    thread = getattr(sampler, "_thread", None)
    if thread is None or not thread.is_alive() or not hasattr(sampler, "_stop"):
        return False
    sampler._stop.set()
    thread.join(timeout=2)
    return True


def _resume_sampler(sampler) -> None:
    sampler._stop.clear()
    sampler._thread = None
    sampler.start()


class GatedHooks:
    """Wraps a cell's ``CellHooks``: every step waits for the gate's word."""

    def __init__(self, inner, paths, sampler=None) -> None:
        self.inner = inner
        self.gate = StepGate(str(paths[0]), str(paths[1]))
        self.sampler = sampler
        self.device = None
        self._profile = None
        self._stopped = False
        self.profiled: list[int] = []
        self.busy: dict[str, Any] | None = None
        self.sampler_pauses = 0

    def __getattr__(self, name: str):  # everything else as the wrapped hooks do it
        return getattr(self.inner, name)

    def wrap(self, model, evidence):
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            pass
        return self.inner.wrap(model, evidence)

    def before_step(self, step: int, sync) -> bool | None:
        """False once the driver said stop (the cell then ends its measured window)."""
        self.inner.before_step(step, sync)
        if self._stopped:
            return False
        paused = _pause_sampler(self.sampler)
        try:
            cmd = self.gate.wait_turn()
        finally:
            if paused:
                self.sampler_pauses += 1
                _resume_sampler(self.sampler)
        if cmd == STOP:
            self._stopped = True
            return False
        if cmd == PROFILE:
            from harness.cell.trackers.gpu_busy import BusyProfile

            self._profile = BusyProfile(self.device).__enter__()
        return None

    def after_step(self, step: int, dt: float) -> None:
        getattr(self.inner, "after_step", lambda *a: None)(step, dt)
        extra: dict[str, Any] = {}
        if self._profile is not None:
            self._profile.__exit__(None, None, None)
            self.busy = extra["busy"] = self._profile.result()
            self.profiled.append(step)
            self._profile = None
        if not self._stopped:
            self.gate.step_done(step, dt, **extra)

    def after_train(self, model, out: dict[str, Any]) -> None:
        self.inner.after_train(model, out)
        out["step_gate"] = {"profiled_steps": self.profiled, "busy": self.busy, "stopped_by_driver": self._stopped,
                            "gate_wait_s": round(self.gate.waited_s, 6), "sampler_pauses": self.sampler_pauses}
        self.gate.end()
