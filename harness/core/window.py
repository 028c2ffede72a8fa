"""The adaptive measured window: when a cell has measured enough steps. Pure module.

With ``M(i)`` the median of the first ``i`` measured step times (the figure a record
reports as ``step_time_s`` once ``i`` steps ran), after measured step ``n`` the window
stops with the first rule that holds:

1. ``stable``: ``n >= min_steps``, ``n > stable_steps`` and the medians
   ``M(n - stable_steps), ..., M(n)`` all lie within ``stable_rel * M(n)`` of each other
   (max minus min): the reported median has stopped moving;
2. ``time_cap``: ``n >= min_steps`` and the measured steps took ``time_cap_s`` seconds
   or more in all (warm-up excluded);
3. ``max_steps``: ``n >= max_steps``.

A window never stops before ``min_steps`` (the cell's ``steps``), whatever the cap says.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Sequence

STOP_RULES: tuple[str, ...] = ("fixed", "stable", "time_cap", "max_steps")


def running_medians(times: Sequence[float]) -> list[float]:
    """``M(1), ..., M(n)``: the median of the first i step times, for every i."""
    return [statistics.median(times[:i]) for i in range(1, len(times) + 1)]


def window_decision(times: Sequence[float], *, min_steps: int, max_steps: int, time_cap_s: float,
                    stable_rel: float, stable_steps: int) -> str | None:
    """Why the measured window ends after these step times, or None to run another step.

    ``times`` are the measured step times so far (warm-up excluded). The rule is in the
    module docstring; the checks are in that order, so a window that is both stable and
    over its cap says ``stable``.
    """
    n = len(times)
    if n == 0:
        return None
    if n >= min_steps:
        if n > stable_steps:
            tail = [statistics.median(times[:i]) for i in range(n - stable_steps, n + 1)]
            if tail[-1] > 0 and (max(tail) - min(tail)) <= stable_rel * tail[-1]:
                return "stable"
        if sum(times) >= time_cap_s:
            return "time_cap"
    if n >= max_steps:
        return "max_steps"
    return None


def simulate_window(times: Iterable[float], **rule: Any) -> tuple[int, str]:
    """Feed step times one by one through the rule: (steps the window ran, why it ended).
    Runs out of input as ``('exhausted')`` when the rule never fired (for tests and notes)."""
    seen: list[float] = []
    for t in times:
        seen.append(float(t))
        why = window_decision(seen, **rule)
        if why:
            return len(seen), why
    return len(seen), "exhausted"
