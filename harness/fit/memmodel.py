"""A memory model: peak memory as a function of sequence length and batch size, fitted
by least squares to measured cells of one model x precision x checkpointing mode.
Pure module (numpy, no torch).

    peak_bytes = fixed_bytes + per_token_bytes * (batch * seq_len)
                 [+ per_token_sq_bytes * batch * seq_len ** 2]

``fixed_bytes`` holds what does not grow with the tokens: base weights, LoRA weights,
their gradients and optimizer state, workspaces. ``per_token_bytes`` is the activation
memory per token the backward pass needs (hidden states kept or offloaded, the
recomputed layer's intermediates, and the logits, which for a 128k vocabulary dominate).
The quadratic term is added only when the attention implementation materialises the
``seq_len x seq_len`` score matrix (``eager``); SDPA's flash and memory-efficient kernels
are linear in the length, and on the H200 reference data a linear fit on 512 and 2048
tokens predicts 8192 tokens within 2% (tests/test_memmodel.py).

The metric is a record field: ``torch_peak_allocated_bytes`` (live tensors: exact and
the same under any budget, so every cell of a row can be used), ``torch_peak_reserved_bytes``
(what the caching allocator holds: live tensors plus the fragmentation of its blocks) or
``peak_vram_bytes`` (NVML, what a user sees). Reserved and NVML points come only from cells
whose allocator was not squeezed by a budget's cap.

**What a budget needs** (``NeedModel``). Under a budget the allocator may hold at most its
cap; a cell fits while what it must hold stays below it. Live tensors alone underestimate
that (on the H200 the allocated-bytes model overshot the longest context by 10-30%:
fragmentation grows with the length, by 0.2-0.5 MiB a token), and the unconstrained
reserved peak overestimates it (under a cap the allocator returns cached blocks before
it fails). So the need is modelled as allocated plus a fraction of the gap to reserved,
``need(L) = allocated(L) + f * (reserved(L) - allocated(L))``, with ``f = 1`` until the
row's own budget cells say otherwise (each fit bounds ``f`` from above, each OOM from
below: ``calibrate_gap``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

QUADRATIC_ATTENTION = ("eager",)


@dataclass(frozen=True)
class Point:
    seq_len: int
    batch_size: int
    peak_bytes: int
    cell_id: str = ""

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size


@dataclass(frozen=True)
class MemModel:
    metric: str
    fixed_bytes: float
    per_token_bytes: float
    per_token_sq_bytes: float = 0.0
    n_points: int = 0
    max_residual_bytes: float = 0.0
    cells: tuple[str, ...] = field(default_factory=tuple)

    @property
    def quadratic(self) -> bool:
        return self.per_token_sq_bytes != 0.0

    def predict(self, seq_len: int, batch_size: int = 1) -> float:
        """Predicted peak (bytes) of a cell with this length and batch: a prediction."""
        t = seq_len * batch_size
        return self.fixed_bytes + self.per_token_bytes * t + self.per_token_sq_bytes * batch_size * seq_len ** 2

    def longest_within(self, bytes_available: float, *, batch_size: int = 1, granularity: int = 1,
                       max_seq_len: int | None = None) -> int:
        """Longest length (a multiple of ``granularity``) whose prediction fits; 0 if none."""
        if self.predict(granularity, batch_size) > bytes_available:
            return 0
        a = self.per_token_sq_bytes * batch_size
        b = self.per_token_bytes * batch_size
        c = self.fixed_bytes - bytes_available
        if a > 0:
            x = (-b + math.sqrt(max(0.0, b * b - 4 * a * c))) / (2 * a)
        elif b > 0:
            x = -c / b
        else:  # memory does not grow with the length
            x = float(max_seq_len or 10 ** 9)
        n = int(x // granularity) * granularity
        while n > granularity and self.predict(n, batch_size) > bytes_available:  # float edge
            n -= granularity
        if max_seq_len is not None:
            n = min(n, (max_seq_len // granularity) * granularity)
        return max(n, granularity)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "fixed_bytes": self.fixed_bytes, "per_token_bytes": self.per_token_bytes,
                "per_token_sq_bytes": self.per_token_sq_bytes, "n_points": self.n_points,
                "max_residual_bytes": self.max_residual_bytes, "cells": list(self.cells)}


class ModelError(ValueError):
    """Too few (or degenerate) points to fit."""


def fit(points: Iterable[Point], *, metric: str, quadratic: bool = False) -> MemModel:
    """Least-squares fit. Needs two distinct token counts (three for the quadratic form)."""
    pts = list(points)
    distinct = len({(p.tokens, p.batch_size * p.seq_len ** 2) for p in pts})
    need = 3 if quadratic else 2
    if distinct < need:
        raise ModelError(f"{metric}: {distinct} distinct cell shapes, {need} needed to fit "
                         f"{'a quadratic' if quadratic else 'a linear'} model")
    t = np.array([p.tokens for p in pts], dtype=float)
    cols = [np.ones_like(t), t]
    if quadratic:
        cols.append(np.array([p.batch_size * float(p.seq_len) ** 2 for p in pts]))
    a = np.stack(cols, axis=1)
    y = np.array([p.peak_bytes for p in pts], dtype=float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    return MemModel(metric=metric, fixed_bytes=float(coef[0]), per_token_bytes=float(coef[1]),
                    per_token_sq_bytes=float(coef[2]) if quadratic else 0.0, n_points=len(pts),
                    max_residual_bytes=float(np.max(np.abs(resid))) if len(pts) else 0.0,
                    cells=tuple(p.cell_id for p in pts))


def wants_quadratic(attn_implementation: str) -> bool:
    return attn_implementation in QUADRATIC_ATTENTION


# A budget cell's reserved peak is its own (not squeezed by the cap) while it stays this far
# below the allocator's limit.
UNSQUEEZED_FRACTION = 0.9
CACHE_METRICS = ("torch_peak_reserved_bytes", "peak_vram_bytes")


def points_from_records(records: Iterable[dict[str, Any]], metric: str) -> list[Point]:
    """Points from ok records that have the metric. NVML and reserved points only from
    cells whose cache was not squeezed: no budget, or (reserved) a peak well below the cap."""
    out = []
    for r in records:
        v = r.get(metric)
        if r.get("status") != "ok" or v is None:
            continue
        if metric in CACHE_METRICS and (r.get("spec") or {}).get("vram_budget_bytes") is not None:
            limit = r.get("allocator_limit_bytes")
            if metric == "peak_vram_bytes" or not limit or v > UNSQUEEZED_FRACTION * limit:
                continue
        out.append(Point(int(r["seq_len"]), int(r.get("batch_size") or 1), int(v), str(r.get("cell_id", ""))))
    return out


@dataclass(frozen=True)
class NeedModel:
    """What a cell needs the allocator to hold under a budget: allocated plus ``fraction``
    of the fragmentation gap to the unconstrained reserved peak."""

    allocated: MemModel
    reserved: MemModel
    fraction: float = 1.0

    @property
    def metric(self) -> str:
        return "need"

    @property
    def quadratic(self) -> bool:
        return self.allocated.quadratic or self.reserved.quadratic

    def predict(self, seq_len: int, batch_size: int = 1) -> float:
        a = self.allocated.predict(seq_len, batch_size)
        gap = max(0.0, self.reserved.predict(seq_len, batch_size) - a)
        return a + self.fraction * gap

    def longest_within(self, bytes_available: float, *, batch_size: int = 1, granularity: int = 1,
                       max_seq_len: int | None = None) -> int:
        """Longest multiple of ``granularity`` whose need fits (a bisection: the need is
        monotone in the length); 0 if not even the shortest fits."""
        if self.predict(granularity, batch_size) > bytes_available:
            return 0
        lo, hi = 1, max(2, (max_seq_len or 10 ** 7) // granularity)
        if self.predict(hi * granularity, batch_size) <= bytes_available:
            return hi * granularity
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.predict(mid * granularity, batch_size) <= bytes_available:
                lo = mid
            else:
                hi = mid
        return lo * granularity

    def to_dict(self) -> dict[str, Any]:
        return {"metric": "need", "fraction": self.fraction, "allocated": self.allocated.to_dict(),
                "reserved": self.reserved.to_dict()}


def calibrate_gap(allocated: MemModel, reserved: MemModel, budget_records: Iterable[dict[str, Any]]) -> float:
    """The fraction of the fragmentation gap a row's budget cells show is needed: a cell
    that fit at length L under limit C needs at most ``(C - alloc(L)) / gap(L)``, one that ran
    out of memory more. The middle of the bounds when they agree; 1 without cells."""
    upper, lower = [], []
    for r in budget_records:
        limit = r.get("allocator_limit_bytes")
        if limit is None or r.get("status") not in ("ok", "oom") or r.get("pruned"):
            continue
        L, b = int(r["seq_len"]), int(r.get("batch_size") or 1)
        a = allocated.predict(L, b)
        gap = reserved.predict(L, b) - a
        if gap <= 0:
            continue
        (upper if r["status"] == "ok" else lower).append((limit - a) / gap)
    hi, lo = (min(upper) if upper else None), (max(lower) if lower else None)
    if hi is not None and lo is not None and lo < hi:
        return max(0.0, (lo + hi) / 2)
    if hi is not None:
        return max(0.0, min(1.0, hi))
    if lo is not None:
        return max(1.0, lo)
    return 1.0


@dataclass(frozen=True)
class Holdout:
    """Prediction error on cells left out of the fit (a measured error, of predictions)."""

    cell_id: str
    seq_len: int
    measured_bytes: int
    predicted_bytes: float

    @property
    def rel_error(self) -> float:
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"cell_id": self.cell_id, "seq_len": self.seq_len, "measured_bytes": self.measured_bytes,
                "predicted_bytes": self.predicted_bytes, "rel_error": self.rel_error}


def holdout_longest(points: list[Point], *, metric: str, quadratic: bool = False) -> Holdout | None:
    """Fit on every point but the longest, predict the longest (extrapolation, the hard case)."""
    pts = sorted(points, key=lambda p: (p.tokens, p.seq_len))
    if not pts:
        return None
    last = pts[-1]
    try:
        m = fit([p for p in pts if p.tokens < last.tokens], metric=metric, quadratic=quadratic)
    except ModelError:
        return None
    return Holdout(last.cell_id, last.seq_len, last.peak_bytes, m.predict(last.seq_len, last.batch_size))


def leave_one_out(points: list[Point], *, metric: str, quadratic: bool = False) -> list[Holdout]:
    """Each point predicted by a model fitted on the others (where the others suffice)."""
    out = []
    for i, p in enumerate(points):
        try:
            m = fit(points[:i] + points[i + 1:], metric=metric, quadratic=quadratic)
        except ModelError:
            continue
        out.append(Holdout(p.cell_id, p.seq_len, p.peak_bytes, m.predict(p.seq_len, p.batch_size)))
    return out
