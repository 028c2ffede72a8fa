"""What a verdict rests on: repeated runs (seeds), the noise they show, and the weights
they trained. Pure module (no torch, no I/O); the claims (``harness.fit.claims``) and the
stability table (``harness.report.stability``) judge with it.

Seeds. A suite that repeats a run takes the session's ``--seed`` and the next integers.
The first seed's cells keep their usual id, so single-seed records and the matrix's cells
are reused; every other seed's id ends in ``/seed<k>`` (``seed_tag``).

Noise. One run of one seed cannot tell a real difference from run-to-run scatter, so a
verdict that compares numbers is decided only when the difference exceeds the noise
measured beside it, and needs at least ``MIN_REPEATS`` runs a side to measure any:

- two sides (``compare``): difference = |median a - median b| / the larger |median|;
  noise = the larger side's repeat spread (max - min over its seeds) on the same scale,
  or any relative spread the caller adds when larger (e.g. a cell's step-time spread).
  Decided when difference > noise; otherwise ``inconclusive``. On one scale, a tiny
  quantity's large relative scatter cannot hide a large absolute difference.
- one side against a fixed limit (``against_limit``): margin = distance of the median
  from the limit; noise = max - min over the seeds (the same units). Decided when margin
  > noise, i.e. the interval median +- spread lies wholly on one side of the limit.

Weights. Random initialisation quantises differently from trained weights with outliers,
so a verdict about numerics names the weights it was measured on (``weights_label``).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

MIN_REPEATS = 2
RANDOM_WEIGHTS = "random weights (synthetic checkpoint)"
_SEED_TAG = re.compile(r"(?:^|/)seed\d+$")


# -- seeds -----------------------------------------------------------------------------

def seeds(base: int, n: int) -> tuple[int, ...]:
    return tuple(base + i for i in range(n))


def seed_tag(tag: str, seed: int, base: int) -> str:
    """The tag of a repeat's cell: unchanged for the first seed, ``<tag>/seed<k>`` after."""
    if seed == base:
        return tag
    return f"{tag}/seed{seed}" if tag else f"seed{seed}"


def without_seed_tag(tag: str | None) -> str:
    return _SEED_TAG.sub("", tag or "")


def repeat_key(spec: Mapping[str, Any], *ignore: str) -> tuple:
    """Identity of a run up to its seed: records with the same key are repeats of it."""
    s = dict(spec)
    s.pop("seed", None)
    s["tag"] = without_seed_tag(s.get("tag"))
    for k in ignore:
        s.pop(k, None)
    return tuple(sorted((k, str(v)) for k, v in s.items()))


# -- weights ---------------------------------------------------------------------------

def weights_label(spec: Mapping[str, Any] | None) -> str:
    """What the base weights were: a local checkpoint's (real) or the synthetic one's."""
    path = (spec or {}).get("model_path")
    return f"real weights ({path})" if path else RANDOM_WEIGHTS


# -- noise -----------------------------------------------------------------------------

def finite(xs: Sequence[Any]) -> list[float]:
    out = []
    for x in xs:
        try:
            f = float(x)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def rel_spread(xs: Sequence[float]) -> float | None:
    """(max - min) / |median|; None with fewer than two values (no spread measured)."""
    xs = finite(xs)
    if len(xs) < 2:
        return None
    mid = abs(statistics.median(xs))
    width = max(xs) - min(xs)
    if mid == 0:
        return 0.0 if width == 0 else math.inf
    return width / mid


def step_time_spread(step_times: Sequence[float] | None) -> float | None:
    """A cell's own timing noise: (max - min) / median over its measured steps."""
    return rel_spread(step_times or [])


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "unbounded"
    return f"{x:.0%}" if x >= 0.095 or x == 0 else f"{x:.1%}"


@dataclass(frozen=True)
class Comparison:
    """Two sides' repeated measurements, their difference and the noise it was judged against."""

    a: str
    b: str
    a_values: tuple[float, ...]
    b_values: tuple[float, ...]
    difference: float  # |median a - median b| / the larger |median|
    noise: float | None  # None: too few repeats to measure any
    noise_from: str

    @property
    def a_mid(self) -> float:
        return statistics.median(self.a_values)

    @property
    def b_mid(self) -> float:
        return statistics.median(self.b_values)

    @property
    def decided(self) -> bool:
        return self.noise is not None and self.difference > self.noise

    def text(self, fmt: str | Callable[[float], str] = "{:.4g}", outcome: str | None = None) -> str:
        """e.g. "bf16 0.0223 vs int8 0.0214: difference 4.0% <= noise 9.4% (repeat spread of 2 seeds)"."""
        show = fmt.format if isinstance(fmt, str) else fmt
        head = f"{self.a} {show(self.a_mid)} vs {self.b} {show(self.b_mid)}: difference {_pct(self.difference)}"
        if self.noise is None:
            body = f"{head}, noise not measured ({self.noise_from})"
        else:
            body = f"{head} {'>' if self.decided else '<='} noise {_pct(self.noise)} ({self.noise_from})"
        return body + (f" -> {outcome}" if outcome else "")

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "a_values": list(self.a_values), "b_values": list(self.b_values),
                "a_median": self.a_mid, "b_median": self.b_mid, "difference": self.difference, "noise": self.noise,
                "noise_from": self.noise_from, "decided": self.decided}


def _repeats_word(n: int) -> str:
    return "one seed: no repeat spread" if n == 1 else f"repeat spread of {n} seeds"


def compare(a: str, a_values: Sequence[float], b: str, b_values: Sequence[float], *,
            extra_noise: Mapping[str, float | None] | None = None, min_repeats: int = MIN_REPEATS) -> Comparison:
    """``a`` against ``b`` (see the module docstring); ``extra_noise``: other relative spreads
    by what they are (e.g. {"step-time spread of bf16": 0.04}), counted when larger."""
    av, bv = tuple(finite(a_values)), tuple(finite(b_values))
    if not av or not bv:
        raise ValueError(f"compare needs a finite value on each side ({a}: {list(a_values)}, {b}: {list(b_values)})")
    am, bm = statistics.median(av), statistics.median(bv)
    scale = max(abs(am), abs(bm))
    diff = abs(am - bm) / scale if scale else 0.0
    n = min(len(av), len(bv))
    width = max(max(av) - min(av), max(bv) - min(bv))
    sources = {_repeats_word(n): (width / scale) if scale else (0.0 if width == 0 else math.inf)}
    sources.update({k: v for k, v in (extra_noise or {}).items() if v is not None})
    if n < min_repeats:
        seen = "; ".join(f"{k} {_pct(v)}" for k, v in list(sources.items())[1:])
        return Comparison(a, b, av, bv, diff, None, _repeats_word(n) + (f"; {seen}" if seen else ""))
    src, noise = max(sources.items(), key=lambda kv: kv[1])
    return Comparison(a, b, av, bv, diff, noise, src)


@dataclass(frozen=True)
class LimitCheck:
    """Repeated measurements of one quantity against a fixed limit."""

    what: str
    values: tuple[float, ...]
    limit: float
    upper: bool  # True: the value must stay at or below the limit; False: at or above
    noise: float | None  # max - min over the seeds; None with too few
    fmt: str = "{:.3f}"  # how the values, the margin and the noise are shown

    @property
    def mid(self) -> float:
        return statistics.median(self.values)

    @property
    def margin(self) -> float:
        """Distance of the median from the limit, positive on the allowed side."""
        return (self.limit - self.mid) if self.upper else (self.mid - self.limit)

    @property
    def decided(self) -> bool:
        return self.noise is not None and abs(self.margin) > self.noise

    @property
    def inside(self) -> bool:
        return self.margin > 0

    def text(self) -> str:
        """e.g. "final / fp32 1.247 (seeds 1.240-1.254), limit 1.25: 0.003 inside <= noise 0.014 (...)"."""
        fmt = self.fmt
        seen = fmt.format(self.mid)
        if len(self.values) > 1:
            seen += f" (seeds {fmt.format(min(self.values))}-{fmt.format(max(self.values))})"
        else:
            seen += " (one seed)"
        side = "inside" if self.inside else "outside"
        head = f"{self.what} {seen}, limit {fmt.format(self.limit)}: {fmt.format(abs(self.margin))} {side}"
        if self.noise is None:
            return f"{head}, noise not measured (one seed: no seed spread)"
        return f"{head} {'>' if self.decided else '<='} noise {fmt.format(self.noise)} " \
               f"(spread of {len(self.values)} seeds)"

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "values": list(self.values), "median": self.mid, "limit": self.limit,
                "upper": self.upper, "margin": self.margin, "noise": self.noise, "decided": self.decided,
                "inside": self.inside}


def against_limit(what: str, values: Sequence[float], limit: float, *, upper: bool,
                  min_repeats: int = MIN_REPEATS, fmt: str = "{:.3f}") -> LimitCheck:
    vs = tuple(finite(values))
    if not vs:
        raise ValueError(f"{what}: no finite value to judge")
    noise = (max(vs) - min(vs)) if len(vs) >= min_repeats else None
    return LimitCheck(what, vs, limit, upper, noise, fmt)
