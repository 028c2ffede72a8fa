"""Training stability across precisions: each precision's loss curve judged against the
fp32 curve of the same model, LoRA, seed and task. Pure module (no torch).

What is measured per precision (``judge``):
- first / final loss: the mean of the first / last ``window`` steps (single steps are
  noisy: every step draws a fresh batch);
- drop: how much the loss fell, (first - final) / first;
- final-loss ratio: final / fp32's final;
- largest deviation: max |loss - fp32 loss| over the steps both have finite, and where;
- non-finite steps: every step whose loss is NaN or inf, with the first value;
- loss-scaler skips (fp16 and fp16-compute modes): steps GradScaler skipped.

A precision fails (``problems``) when any loss is not finite (naming the step, the value
and the worker's diagnosis, e.g. "fp16 overflow: activations became inf at step 3 in
..."), when its loss does not clearly fall, or when it ends far above fp32's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from harness.core.fmt import markdown_table


@dataclass(frozen=True)
class Thresholds:
    window: int = 10  # steps averaged for the first / final loss
    min_drop: float = 0.15  # the loss must fall by at least 15% ("clearly falls")
    max_final_ratio: float = 1.25  # final loss at most 25% above fp32's


@dataclass(frozen=True)
class StabilityResult:
    cell_id: str
    model: str
    precision: str
    steps: int
    status: str
    first_loss: float | None
    final_loss: float | None
    drop: float | None
    reference_final_loss: float | None
    final_ratio: float | None
    max_abs_deviation: float | None
    max_deviation_step: int | None
    nonfinite_steps: list[int] = field(default_factory=list)
    first_nonfinite: tuple[int, str] | None = None
    scaler_skipped_steps: int | None = None
    loss_scaling: bool | None = None
    diagnosis: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.status != "ok":
            return self.status
        if self.nonfinite_steps:
            return "non-finite"
        return "stable" if not self.problems else "unstable"


def to_float(x: Any) -> float:
    """Loss values as stored: floats, or "nan" / "inf" / "-inf" strings (see result.dumps)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def judge(rec: dict[str, Any], reference: dict[str, Any] | None,
          th: Thresholds = Thresholds()) -> StabilityResult:
    """One precision's record against the fp32 reference record (None when it is fp32)."""
    losses = [to_float(x) for x in rec.get("losses") or []]
    n = len(losses)
    w = max(1, min(th.window, n // 4 or 1))
    first, final = _mean(losses[:w]), _mean(losses[-w:])
    nonfinite = [i for i, x in enumerate(losses) if not math.isfinite(x)]
    ref = [to_float(x) for x in (reference or {}).get("losses") or []]
    ref_final = _mean(ref[-w:]) if ref else None
    devs = [(abs(a - b), i) for i, (a, b) in enumerate(zip(losses, ref)) if math.isfinite(a) and math.isfinite(b)]
    max_dev, max_dev_step = max(devs) if devs and reference is not None else (None, None)
    problems: list[str] = []
    status = rec.get("status", "?")
    diag = rec.get("nonfinite_message")
    if status == "ok":
        if nonfinite:
            i0 = nonfinite[0]
            shown = ", ".join(f"{i}: {_fmt(losses[i])}" for i in nonfinite[:5])
            problems.append(f"loss not finite at {len(nonfinite)} of {n} steps, first at step {i0} "
                            f"(step: loss {shown}{', ...' if len(nonfinite) > 5 else ''})"
                            + (f"; {diag}" if diag else ""))
        elif first is not None and final is not None:
            drop = (first - final) / first if first else 0.0
            if drop < th.min_drop:
                problems.append(f"the loss did not clearly fall: {_fmt(first)} over the first {w} steps, "
                                f"{_fmt(final)} over the last {w} ({drop:.0%} drop, need {th.min_drop:.0%})")
        if ref_final and final is not None and not nonfinite and final / ref_final > th.max_final_ratio:
            dev = f"; largest deviation {_fmt(max_dev)} at step {max_dev_step} " \
                  f"({_fmt(losses[max_dev_step])} vs {_fmt(ref[max_dev_step])})" if max_dev is not None else ""
            problems.append(f"diverged from fp32: final loss {_fmt(final)} vs {_fmt(ref_final)} "
                            f"(ratio {final / ref_final:.2f}, limit {th.max_final_ratio}){dev}")
    return StabilityResult(
        cell_id=rec.get("cell_id", "?"), model=rec.get("model") or "?", precision=rec.get("precision") or "?",
        steps=n, status=status, first_loss=first, final_loss=final,
        drop=((first - final) / first) if first and final is not None else None, reference_final_loss=ref_final,
        final_ratio=(final / ref_final) if (final is not None and ref_final) else None,
        max_abs_deviation=max_dev, max_deviation_step=max_dev_step, nonfinite_steps=nonfinite,
        first_nonfinite=(nonfinite[0], _fmt(losses[nonfinite[0]])) if nonfinite else None,
        scaler_skipped_steps=rec.get("scaler_skipped_steps"), loss_scaling=rec.get("loss_scaling"),
        diagnosis=diag, problems=problems)


def reference_key(rec: dict[str, Any]) -> tuple:
    """Records compared with each other share everything but the precision."""
    spec = dict(rec.get("spec") or {})
    spec.pop("precision", None)
    return tuple(sorted((k, str(v)) for k, v in spec.items()))


def judge_all(records: Iterable[dict[str, Any]], th: Thresholds = Thresholds()) -> list[StabilityResult]:
    recs = list(records)
    refs = {reference_key(r): r for r in recs if r.get("precision") == "fp32"}
    out = []
    for r in recs:
        ref = None if r.get("precision") == "fp32" else refs.get(reference_key(r))
        out.append(judge(r, ref, th))
    return out


def _cell(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(results: list[StabilityResult], th: Thresholds = Thresholds(), host: str = "") -> str:
    head = ["model", "precision", "steps", "first loss", "final loss", "drop", "final / fp32",
            "largest deviation (step)", "non-finite steps", "scaler skipped", "verdict"]
    body = []
    for r in results:
        body.append([r.model, r.precision, r.steps, _cell(r.first_loss), _cell(r.final_loss),
                     _cell(r.drop, "{:.0%}"), _cell(r.final_ratio),
                     f"{r.max_abs_deviation:.3f} ({r.max_deviation_step})" if r.max_abs_deviation is not None else "-",
                     f"{len(r.nonfinite_steps)} (first {r.first_nonfinite[0]}: {r.first_nonfinite[1]})"
                     if r.nonfinite_steps else "0",
                     "-" if r.scaler_skipped_steps is None else r.scaler_skipped_steps, r.verdict])
    out = [f"# Training stability{(' — ' + host) if host else ''}", "",
           f"First / final loss: mean of the first / last {th.window} steps (fewer on short runs). A precision "
           f"fails when a loss is not finite, when its loss falls less than {th.min_drop:.0%}, or when its final "
           f"loss is more than {th.max_final_ratio}x fp32's.", "", markdown_table(head, body), ""]
    notes = [f"- {r.cell_id}: " + "; ".join(r.problems) for r in results if r.problems]
    out += ["## Findings", ""] + (notes or ["None: every precision trained like fp32."])
    return "\n".join(out) + "\n"


def report(records: Iterable[dict[str, Any]], th: Thresholds = Thresholds(), host: str = "") -> dict[str, Any]:
    recs = list(records)
    results = judge_all(recs, th)
    return {
        "host": host,
        "thresholds": asdict(th),
        "rows": [dict(asdict(r), verdict=r.verdict) for r in results],
        "curves": {r.get("cell_id"): r.get("losses") for r in recs},
        "markdown": markdown(results, th, host),
    }
