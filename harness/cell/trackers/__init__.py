"""Measurement trackers wrapped around a cell's work (worker side).

A tracker is a context manager that measures while its ``with`` block runs (entering
starts it, leaving stops it, however the block ends) and has ``finish(out)``, which writes
its figures into the cell's result. ``Trackers`` stacks them: a cell that runs out of
memory or raises still gets every figure its trackers measured up to then.
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeVar

T = TypeVar("T")


class Trackers:
    """Trackers stacked around a block (``contextlib.ExitStack``).

    ``add(tracker)`` enters a tracker: from then on it is stopped when the block ends.
    On leaving, ``clock`` (the cell's phase clock, optional) stops first: the cell's work
    ends there, and the trackers' own stopping is teardown. The trackers then stop in
    reverse order, and finally every one of them writes its fields into ``out`` in the
    order they were added, the clock first: a later tracker may read an earlier one's
    figures (the VRAM budget's verdict reads the sampler's peak). A tracker whose start
    raised still writes what it has.
    """

    def __init__(self, out: dict[str, Any], clock: Any = None) -> None:
        self.out = out
        self.clock = clock
        self._stack = contextlib.ExitStack()
        self._added: list[Any] = []

    def add(self, tracker: T) -> T:
        self._added.append(tracker)
        return self._stack.enter_context(tracker)

    def __enter__(self) -> "Trackers":
        if self.clock is not None:
            self.clock.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        try:
            if self.clock is not None:
                self.clock.__exit__(*exc)
            return bool(self._stack.__exit__(*exc))
        finally:
            for tracker in ([self.clock] if self.clock is not None else []) + self._added:
                tracker.finish(self.out)
