"""Baseline vs current: which cells regressed. Pure module (pandas in, values out).

Thresholds name any numeric metric and the direction that is worse:
``tokens_per_s:-5%`` (a drop of more than 5% regresses), ``peak_vram_bytes:+3%`` (a rise
of more than 3%), or an absolute amount in the stored unit (``mfu:-0.02``).

Repeated measurements set a noise band. Step-time metrics (``step_time_s``,
``tokens_per_s``, ``mfu``) have one value per measured step, so every record carries its
own spread; any metric has a spread when a side holds several records of a cell (a
retried cell, a baseline made of several runs). A change past the threshold but inside
that spread (the current value within the baseline's range, or the baseline value within
the current's) is reported as ``noise``, not as a regression. Memory peaks are one
measurement per record: with one record a side they are judged by the threshold alone.

A status change is a regression when it gets worse: ok -> anything else, or OOM /
unsupported -> error / crash / timeout.

The check fails closed, so that nothing reads as green without having been checked:

- a baseline cell missing from the current run is a regression (``allow_missing``
  lists it instead, for a run that selected fewer cells on purpose);
- an ok baseline cell whose metric the current run's ok record lacks is a regression;
- a threshold that no cell could check is an error (``nothing_checked``), not a pass;
- a speed change in a cell whose measured steps disagree (``harness.core.steps``: the
  record is not ``stable``) is ``unstable``: neither a pass nor a regression; the
  comparison says so (``inconclusive``);
- records of a cell with several settings fingerprints on one side are not pooled as
  repeats: the latest settings' records stand (a note says so).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pandas as pd

from harness.core import schema
from harness.core import steps as steps_mod
from harness.report.units import as_float

# memory_bytes: peak VRAM on a GPU, peak resident memory on a CPU host (the report frame's).
DEFAULT_THRESHOLDS: tuple[str, ...] = ("tokens_per_s:-5%", "memory_bytes:+3%")
# Columns of the report frame that are not record fields: the one derived metric, and
# bookkeeping numbers that are never a metric. Record fields are judged by the schema.
FRAME_METRICS = frozenset({"memory_bytes"})
FRAME_NOT_METRICS = frozenset({"record_index", "tokens_per_step", "attempts", "seed"})


def not_metrics() -> frozenset[str]:
    """Numbers that describe a cell rather than measure it: never a metric."""
    return frozenset(schema.non_metric_numbers()) | FRAME_NOT_METRICS


def known_metrics() -> frozenset[str]:
    return frozenset(schema.metric_fields()) | FRAME_METRICS


def step_metrics() -> tuple[str, ...]:
    """Metrics with one value per measured step: each record carries its own spread."""
    return schema.step_metrics()


_DERIVED = {"NOT_METRICS": not_metrics, "KNOWN_METRICS": known_metrics, "STEP_METRICS": step_metrics}


def __getattr__(name: str) -> Any:
    # Read from the schema on each access, so a field declared later (a test's) counts.
    if name in _DERIVED:
        return _DERIVED[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Severity of an outcome: a rise is a regression, a fall an improvement.
SEVERITY = {"ok": 0, "oom": 1, "unsupported": 1, "error": 2, "crash": 2, "timeout": 2}


class CompareError(ValueError):
    """Unusable comparison input: a malformed threshold, an unknown metric, no common cell."""


@dataclass(frozen=True)
class Threshold:
    metric: str
    direction: int  # +1: a rise is worse; -1: a drop is worse
    amount: float  # a fraction when relative, else in the metric's stored unit
    relative: bool
    text: str

    def describe(self) -> str:
        how = "rise" if self.direction > 0 else "drop"
        size = f"{self.amount * 100:g}%" if self.relative else f"{self.amount:g} (stored unit)"
        return f"{self.metric}: a {how} of more than {size} is a regression"


_THRESHOLD = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*:\s*([+-])\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%?)\s*$")


def parse_threshold(text: str) -> Threshold:
    """``'tokens_per_s:-5%'`` -> Threshold (the metric name is checked later)."""
    m = _THRESHOLD.match(text)
    if not m:
        if re.match(r"^\s*[A-Za-z0-9_.]+\s*:\s*[0-9]", text):
            name, amount = text.split(":", 1)
            raise CompareError(f"threshold {text!r}: say which way is worse, e.g. {name.strip()}:-{amount.strip()} "
                               f"(a drop regresses) or {name.strip()}:+{amount.strip()} (a rise regresses)")
        raise CompareError(f"threshold {text!r} is not METRIC:+N% / METRIC:-N% (e.g. tokens_per_s:-5%)")
    name, sign, amount, pct = m.groups()
    value = float(amount) / (100.0 if pct else 1.0)
    return Threshold(name, 1 if sign == "+" else -1, value, bool(pct), text.strip())


def parse_thresholds(texts: Iterable[str]) -> tuple[Threshold, ...]:
    out = []
    for t in texts:
        out += [parse_threshold(part) for part in str(t).split(",") if part.strip()]
    return tuple(out)


def metric_names(*frames: pd.DataFrame) -> set[str]:
    """Metrics a threshold may name: the schema's, plus numeric columns the runs hold."""
    names, never = set(known_metrics()), not_metrics()
    for f in frames:
        names |= {c for c in f.columns if pd.api.types.is_numeric_dtype(f[c]) and c not in never}
    return names


def check_metrics(thresholds: Sequence[Threshold], *frames: pd.DataFrame) -> None:
    known = metric_names(*frames)
    for t in thresholds:
        if t.metric not in known:
            common = ", ".join(m for m in ("tokens_per_s", "step_time_s", "peak_vram_bytes", "peak_rss_bytes",
                                           "torch_peak_allocated_bytes", "mfu", "energy_per_token_j"))
            raise CompareError(f"unknown metric {t.metric!r} in threshold {t.text!r}; metrics include {common}")


@dataclass(frozen=True)
class Side:
    """One side's measurements of one metric of one cell."""

    value: float | None  # median over the side's records
    low: float | None  # spread of the repeated measurements (None: a single measurement)
    high: float | None
    samples: int  # measurements behind the band
    records: int

    def contains(self, x: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= x <= self.high


@dataclass(frozen=True)
class MetricVerdict:
    cell_id: str
    threshold: Threshold
    baseline: Side
    current: Side
    change_abs: float | None
    change_rel: float | None
    verdict: str  # regression, noise, unstable, improved, ok, not measured
    note: str = ""


@dataclass(frozen=True)
class CellVerdict:
    cell_id: str
    kind: str  # status, added, removed
    baseline_status: str | None
    current_status: str | None
    verdict: str  # regression, improved, changed, listed
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    thresholds: tuple[Threshold, ...]
    metrics: tuple[MetricVerdict, ...]
    cells: tuple[CellVerdict, ...]
    compared: int  # cells in both sides
    warnings: tuple[str, ...] = ()

    @property
    def regressions(self) -> list[MetricVerdict | CellVerdict]:
        return [v for v in (*self.cells, *self.metrics) if v.verdict == "regression"]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)

    @property
    def unstable(self) -> list[MetricVerdict]:
        return [m for m in self.metrics if m.verdict == "unstable"]

    @property
    def inconclusive(self) -> bool:
        """No regression, but some change could not be judged (an unstable cell)."""
        return not self.regressed and bool(self.unstable)

    def unchecked(self) -> list[Threshold]:
        """Thresholds no compared cell could check (no value on both sides anywhere)."""
        return [t for t in self.thresholds
                if not any(m.threshold is t and m.verdict not in ("not measured",) for m in self.metrics)]


def _per_step(rec: pd.Series, metric: str) -> list[float]:
    """One value per measured step for step-time metrics; [] for the rest."""
    steps = [t for t in (rec.get("step_times_s") or []) if t and t > 0]
    if metric not in step_metrics() or len(steps) < 2:
        return []
    if metric == "step_time_s":
        return steps
    tokens = as_float(rec.get("tokens_per_step"))
    if metric == "tokens_per_s" and tokens:
        return [tokens / t for t in steps]
    median_t, mfu = as_float(rec.get("step_time_s")), as_float(rec.get("mfu"))
    if metric == "mfu" and median_t and mfu is not None:
        return [mfu * median_t / t for t in steps]  # MFU is proportional to 1 / step time
    return []


def side(records: pd.DataFrame, metric: str) -> Side:
    """The ok records of one cell on one side -> value and spread of ``metric``."""
    values = [v for v in (as_float(x) for x in records.get(metric, pd.Series(dtype=float))) if v is not None]
    if not values:
        return Side(None, None, None, 0, len(records))
    steps = [s for _, r in records.iterrows() for s in _per_step(r, metric)]
    band = steps if len(steps) >= 2 else values if len(values) >= 2 else []
    return Side(statistics.median(values), min(band) if band else None, max(band) if band else None,
                len(band), len(values))


def judge(cell_id: str, t: Threshold, base: Side, cur: Side, *, unsteady: str = "") -> MetricVerdict:
    """One metric of one cell. ``unsteady``: why a side's measured steps disagree (a
    speed metric there is then ``unstable`` unless it is within the threshold)."""
    if base.value is not None and cur.value is None:
        return MetricVerdict(cell_id, t, base, cur, None, None, "regression",
                             f"{t.metric} measured in the baseline, missing in the current run")
    if base.value is None or cur.value is None:
        return MetricVerdict(cell_id, t, base, cur, None, None, "not measured", "no value in either run"
                             if cur.value is None else "no value in the baseline")
    d = cur.value - base.value
    rel = d / abs(base.value) if base.value else (0.0 if d == 0 else math.copysign(math.inf, d))
    worse = t.direction * (rel if t.relative else d)
    if abs(worse) <= t.amount:
        return MetricVerdict(cell_id, t, base, cur, d, rel, "ok")
    if unsteady and t.metric in step_metrics() and _ranges_overlap(base, cur):
        return MetricVerdict(cell_id, t, base, cur, d, rel, "unstable", unsteady)
    in_band = base.contains(cur.value) or cur.contains(base.value)
    if in_band:
        which = base if base.contains(cur.value) else cur
        where = "baseline" if which is base else "current run"
        note = f"inside the {where}'s spread ({which.samples} measurements)"
        return MetricVerdict(cell_id, t, base, cur, d, rel, "noise", note)
    if worse > 0:
        note = "" if base.low is not None or cur.low is not None else "single measurement each side: threshold only"
        return MetricVerdict(cell_id, t, base, cur, d, rel, "regression", note)
    return MetricVerdict(cell_id, t, base, cur, d, rel, "improved")


def _ranges_overlap(a: Side, b: Side) -> bool:
    """Whether the two sides' measured ranges overlap (a side without a range is its
    value): a change beyond both ranges is real however unsteady the steps were."""
    lo_a, hi_a = (a.low, a.high) if a.low is not None else (a.value, a.value)
    lo_b, hi_b = (b.low, b.high) if b.low is not None else (b.value, b.value)
    return lo_a <= hi_b and lo_b <= hi_a


def _last_status(records: pd.DataFrame) -> str:
    order = records.sort_values(["timestamp", "record_index"], na_position="first", key=_str_key)
    return str(order["status"].iloc[-1])


def _str_key(col: pd.Series) -> pd.Series:
    return col.astype(str) if col.dtype == object else col


def status_verdict(cell_id: str, before: str, after: str) -> CellVerdict | None:
    if before == after:
        return None
    b, a = SEVERITY.get(before, 2), SEVERITY.get(after, 2)
    verdict = "regression" if a > b else "improved" if a < b else "changed"
    return CellVerdict(cell_id, "status", before, after, verdict)


def by_gpu_model(baseline: pd.DataFrame, current: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """A cell is compared only with the same cell on the same GPU model. Where
    the two sides hold more than one GPU model, each record's cell id gets its model
    (``llama-3.1-8b/bf16/s2048/gc-off @ NVIDIA H200``), so cells measured on different
    GPU models never match; returns the frames and the models of each side."""
    def models(f: pd.DataFrame) -> list[str]:
        col = f["gpu_model"] if "gpu_model" in f.columns else pd.Series("?", index=f.index)
        return sorted(set(col.fillna("?").astype(str)))

    b_models, c_models = models(baseline), models(current)
    if len(set(b_models) | set(c_models)) <= 1:
        return baseline, current, b_models

    def keyed(f: pd.DataFrame) -> pd.DataFrame:
        col = f["gpu_model"] if "gpu_model" in f.columns else pd.Series("?", index=f.index)
        return f.assign(cell_id=f["cell_id"].astype(str) + " @ " + col.fillna("?").astype(str))

    return keyed(baseline), keyed(current), b_models


def compare(baseline: pd.DataFrame, current: pd.DataFrame, thresholds: Sequence[Threshold], *,
            allow_missing: bool = False, across_gpus: bool = False) -> Comparison:
    """Judge every cell of ``current`` against ``baseline`` (frames of every record, as
    ``harness.report.load.load_run_set(...).records``). Cells are matched on the same GPU
    model only unless ``across_gpus``."""
    check_metrics(thresholds, baseline, current)
    b_models = sorted(set(baseline.get("gpu_model", pd.Series(dtype=object)).dropna().astype(str)))
    c_models = sorted(set(current.get("gpu_model", pd.Series(dtype=object)).dropna().astype(str)))
    shared_ids = set(baseline["cell_id"]) & set(current["cell_id"])  # whatever the GPU model
    if not across_gpus:
        baseline, current, _ = by_gpu_model(baseline, current)
    b_ids, c_ids = set(baseline["cell_id"]), set(current["cell_id"])
    # the current run's file order is the matrix's order: report cells in it
    common = [c for c in dict.fromkeys(current["cell_id"]) if c in b_ids]
    if not common:
        if not across_gpus and shared_ids:
            raise CompareError(f"the baseline ran on {', '.join(b_models)} and the current run on "
                               f"{', '.join(c_models)}: cells are compared on the same GPU model only "
                               "(--across-gpus compares them anyway)")
        raise CompareError(f"no cell in common between the baseline ({len(b_ids)} cells, e.g. {min(b_ids)}) and "
                           f"the current run ({len(c_ids)} cells, e.g. {min(c_ids)})")
    notes: list[str] = []
    if not across_gpus and len(set(b_models) | set(c_models)) > 1:
        notes.append(f"GPU models: baseline {', '.join(b_models)}; current {', '.join(c_models)}: each cell is "
                     "compared with the same cell on the same GPU model only (ids carry the model)")
    b_dev = sorted(set(baseline[baseline["cell_id"].isin(common)]["device_label"].astype(str)))
    c_dev = sorted(set(current[current["cell_id"].isin(common)]["device_label"].astype(str)))
    if b_dev != c_dev:
        notes.append(f"the baseline ran on {', '.join(b_dev)} and the current run on {', '.join(c_dev)}: "
                     "differences include the hardware")
    cells: list[CellVerdict] = []
    metrics: list[MetricVerdict] = []
    b_groups, c_groups = dict(tuple(baseline.groupby("cell_id"))), dict(tuple(current.groupby("cell_id")))
    for cid in common:
        b, c = b_groups[cid], c_groups[cid]
        sv = status_verdict(cid, _last_status(b), _last_status(c))
        if sv:
            cells.append(sv)
        b_ok, c_ok = _same_settings(b[b["status"] == "ok"], notes), _same_settings(c[c["status"] == "ok"], notes)
        if b_ok.empty or c_ok.empty:
            continue  # no finished measurement on one side: the status says it all
        unsteady = _unsteady(b_ok, "baseline") or _unsteady(c_ok, "current run")
        for t in thresholds:
            metrics.append(judge(cid, t, side(b_ok, t.metric), side(c_ok, t.metric), unsteady=unsteady))
    for cid in [c for c in dict.fromkeys(current["cell_id"]) if c not in b_ids]:
        cells.append(CellVerdict(cid, "added", None, _last_status(c_groups[cid]), "listed", "not in the baseline"))
    for cid in [c for c in dict.fromkeys(baseline["cell_id"]) if c not in c_ids]:
        cells.append(CellVerdict(cid, "removed", _last_status(b_groups[cid]), None,
                                 "listed" if allow_missing else "regression", "not in the current run"))
    if not metrics and thresholds:
        notes.append("no cell finished (ok) on both sides: only statuses were compared")
    return Comparison(tuple(thresholds), tuple(metrics), tuple(cells), len(common), tuple(notes))


def _same_settings(ok: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """The records of one cell that share the latest record's settings fingerprint: records
    of other settings are other measurements, never repeats of this one."""
    if ok.empty or "fingerprint" not in ok.columns:
        return ok
    fps = ok["fingerprint"].astype(str)
    latest = fps.iloc[-1]
    if fps.nunique() > 1 and latest not in ("None", "nan"):
        notes.append(f"{ok['cell_id'].iloc[-1]}: records of {fps.nunique()} different settings; only the latest "
                     "settings' records are compared")
        return ok[fps == latest]
    return ok


def _unsteady(ok: pd.DataFrame, where: str) -> str:
    """Why the side's measured steps disagree, or ''."""
    for _, r in ok.iterrows():
        rec = {k: r.get(k) for k in ("stable", "step_times_s", "step_time_spread")}
        if not isinstance(rec["stable"], bool):
            rec.pop("stable")
        if steps_mod.is_stable(rec) is False:
            spread = as_float(r.get("step_time_spread"))
            return (f"the {where}'s measured steps spread {spread:.0%} (> {steps_mod.STABLE_SPREAD:.0%}): "
                    "cannot tell a change from noise" if spread is not None else f"the {where}'s cell is unstable")
    return ""
