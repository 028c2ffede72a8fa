"""Interleaved paired A/B comparisons: per-round ratios, a 95% confidence interval and a
verdict against a target. Pure module (standard library only; no torch, no harness).

Why paired rounds: on the H200 host the tokens/s of the same cell spread 15-56% between
fresh processes and 20-55% between the steps of one cell, because the host CPU (kernel
launches) wanders. A slow spell of the host slows both sides of a round alike, so the
ratio of the two sides *within* a round is far steadier than either side's own times;
the comparison is made on those ratios.

The method, for rounds ``r = 1..n`` with paired measurements ``tA[r]``, ``tB[r]`` (for
example the mean step time of side A and of side B in round r):

- ratio ``q[r] = tA[r] / tB[r]``: B's throughput relative to A's (> 1: B is faster);
- ``x[r] = ln q[r]``; mean ``m``, sample standard deviation ``s`` (n - 1 in the
  denominator), standard error ``s / sqrt(n)``;
- the 95% confidence interval of the mean log ratio is ``m +- h`` with half-width
  ``h = t(0.975, n - 1) * s / sqrt(n)`` (Student's t with n - 1 degrees of freedom);
  as ratios: ``[exp(m - h), exp(m + h)]``; the point estimate is the geometric-mean
  ratio ``exp(m)``. **Assumption**: the rounds' log ratios are independent draws from
  one normal distribution (the pairing is what removes the host's slow drift; a drift
  *within* a round, or a carry-over from one side to the next, is what the alternating
  order of :func:`schedule` is for). With few rounds and heavy-tailed noise the interval
  is only approximate.
- verdict against a target (:func:`parse_target`): ``met`` when the whole interval lies
  on the target's side, ``missed`` when the whole interval lies on the wrong side,
  ``cannot tell`` otherwise (and with fewer than 2 rounds);
- the noise: the half-width as a relative figure ``exp(h) - 1``;
- ``rounds_to_decide``: the fewest rounds whose interval, at the observed mean and
  spread, would clear the target's nearest boundary (None when the mean sits on it).

Targets: ``"ratio >= 0.97"`` (also ``>``, ``<=``, ``<``), ``"cost < 1%"`` (the same as
``ratio > 0.99``: B costs less than 1% of A's throughput), ``"within 1%"``
(``0.99 <= ratio <= 1.01``).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

CONFIDENCE = 0.95


# -- Student's t -------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`; ~1e-10 absolute)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


# -- targets -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """``lo < ratio`` / ``lo <= ratio`` and / or ``ratio < hi`` / ``ratio <= hi``."""

    text: str
    lo: float | None = None
    hi: float | None = None
    lo_inclusive: bool = False
    hi_inclusive: bool = False

    def bounds_log(self) -> list[float]:
        return [math.log(v) for v in (self.lo, self.hi) if v is not None]


_RATIO = re.compile(r"^ratio\s*(>=|>|<=|<)\s*([0-9.]+)$")
_COST = re.compile(r"^cost\s*<\s*([0-9.]+)\s*%$")
_WITHIN = re.compile(r"^within\s*([0-9.]+)\s*%$")


def parse_target(text: str) -> Target:
    """'ratio >= 0.97', 'ratio < 1.05', 'cost < 1%' (ratio > 0.99), 'within 1%'."""
    s = text.strip().lower()
    if m := _RATIO.match(s):
        v, inclusive = float(m[2]), m[1].endswith("=")
        if m[1].startswith(">"):
            return Target(text, lo=v, lo_inclusive=inclusive)
        return Target(text, hi=v, hi_inclusive=inclusive)
    if m := _COST.match(s):
        return Target(text, lo=1.0 - float(m[1]) / 100.0)
    if m := _WITHIN.match(s):
        p = float(m[1]) / 100.0
        return Target(text, lo=1.0 - p, hi=1.0 + p, lo_inclusive=True, hi_inclusive=True)
    raise ValueError(f"target {text!r}: write 'ratio >= 0.97', 'cost < 1%' or 'within 1%'")


def verdict(lo: float, hi: float, target: Target) -> str:
    """'met' / 'missed' / 'cannot tell' for the ratio interval [lo, hi]."""
    ok_lo = target.lo is None or lo > target.lo or (lo == target.lo and target.lo_inclusive)
    ok_hi = target.hi is None or hi < target.hi or (hi == target.hi and target.hi_inclusive)
    if ok_lo and ok_hi:
        return "met"
    if (target.lo is not None and hi < target.lo) or (target.hi is not None and lo > target.hi):
        return "missed"
    return "cannot tell"


def point_verdict(ratio: float | None, target: Target) -> str | None:
    """The verdict for one exact figure (no noise: the torch allocator's peak)."""
    if ratio is None:
        return None
    return verdict(ratio, ratio, target)


# -- the comparison ----------------------------------------------------------------------

@dataclass
class Comparison:
    target: str
    n: int
    ratios: list[float]
    geomean_ratio: float | None = None
    mean_log: float | None = None
    sd_log: float | None = None
    ci: tuple[float, float] | None = None  # as ratios
    half_width_log: float | None = None
    half_width: float | None = None  # exp(h) - 1: +- this fraction around the geometric mean
    verdict: str = "cannot tell"
    rounds_to_decide: int | None = None
    confidence: float = CONFIDENCE
    method: str = field(default="Student t on per-round log ratios (rounds independent, log ratios normal)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci else None
        return d


def paired_ratios(a_times: Sequence[float], b_times: Sequence[float]) -> list[float]:
    """Per-round throughput ratio of B over A: ``tA / tB``."""
    if len(a_times) != len(b_times):
        raise ValueError(f"paired rounds differ in number: {len(a_times)} vs {len(b_times)}")
    return [a / b for a, b in zip(a_times, b_times)]


def rounds_to_decide(mean_log: float, sd_log: float, target: Target, confidence: float = CONFIDENCE,
                     n_max: int = 10_000_000) -> int | None:
    """Fewest rounds n >= 2 with ``t(n-1) * sd / sqrt(n)`` below the distance from the mean
    to the target's nearest boundary (the interval would then clear it); None if the
    mean sits on a boundary or more than ``n_max`` rounds would be needed."""
    bounds = target.bounds_log()
    dist = min(abs(mean_log - b) for b in bounds)
    if dist == 0.0:
        return None
    if sd_log == 0.0:
        return 2
    q = 0.5 + confidence / 2.0
    z = statistics.NormalDist().inv_cdf(q)
    n = max(2, math.ceil((z * sd_log / dist) ** 2))
    while t_quantile(q, n - 1) * sd_log / math.sqrt(n) >= dist:
        n += 1
        if n > n_max:
            return None
    return n


def compare_ratios(ratios: Sequence[float], target: str | Target, confidence: float = CONFIDENCE) -> Comparison:
    """The comparison of per-round ratios against ``target``."""
    tgt = parse_target(target) if isinstance(target, str) else target
    ratios = [float(r) for r in ratios]
    if any(not (r > 0 and math.isfinite(r)) for r in ratios):
        raise ValueError("ratios must be positive and finite")
    out = Comparison(target=tgt.text, n=len(ratios), ratios=ratios, confidence=confidence)
    if not ratios:
        return out
    logs = [math.log(r) for r in ratios]
    m = sum(logs) / len(logs)
    out.mean_log, out.geomean_ratio = m, math.exp(m)
    if len(logs) < 2:
        return out
    s = math.sqrt(sum((x - m) ** 2 for x in logs) / (len(logs) - 1))
    h = t_quantile(0.5 + confidence / 2.0, len(logs) - 1) * s / math.sqrt(len(logs))
    out.sd_log, out.half_width_log, out.half_width = s, h, math.expm1(h)
    out.ci = (math.exp(m - h), math.exp(m + h))
    out.verdict = verdict(out.ci[0], out.ci[1], tgt)
    out.rounds_to_decide = rounds_to_decide(m, s, tgt, confidence)
    return out


def compare(a_times: Sequence[float], b_times: Sequence[float], target: str | Target,
            confidence: float = CONFIDENCE) -> Comparison:
    """B against A from paired per-round times (``tA[r] / tB[r]`` per round)."""
    return compare_ratios(paired_ratios(a_times, b_times), target, confidence)


# -- the order of the sides within each round ---------------------------------------------

def schedule(rounds: int, sides: Sequence[str] = ("A", "B"), scheme: str = "abba") -> list[tuple[str, ...]]:
    """The order in which the sides take their turn in each round.

    ``alternate``: the given order, then reversed, and so on (AB, BA, AB, BA ...).
    ``abba``: rotated by one every two rounds and reversed on every odd round: for two
    sides AB, BA, BA, AB (a linear drift cancels over each block of four); for three
    ABC, CBA, BCA, ACB, CAB, BAC (every side in every position equally often).
    """
    sides = tuple(sides)
    if scheme not in ("abba", "alternate"):
        raise ValueError(f"scheme must be abba or alternate, got {scheme!r}")
    out = []
    for r in range(rounds):
        k = (r // 2) % len(sides) if scheme == "abba" else 0
        order = sides[k:] + sides[:k]
        out.append(tuple(reversed(order)) if r % 2 else order)
    return out


def fmt_comparison(c: Comparison | dict[str, Any] | None) -> tuple[str, str, str, str, str]:
    """(ratio, 95% CI, +- noise, verdict, rounds to decide) as table cells."""
    if c is None:
        return ("n/a",) * 5
    d = c.to_dict() if isinstance(c, Comparison) else c
    ratio = f"{d['geomean_ratio']:.4f}" if d.get("geomean_ratio") is not None else "n/a"
    ci = f"[{d['ci'][0]:.4f}, {d['ci'][1]:.4f}]" if d.get("ci") else "n/a"
    noise = f"+-{d['half_width']:.2%}" if d.get("half_width") is not None else "n/a"
    need = str(d["rounds_to_decide"]) if d.get("rounds_to_decide") is not None else "-"
    return ratio, ci, noise, d.get("verdict") or "cannot tell", need
