"""Training stability across precisions: each precision's loss curves judged against the
fp32 curves of the same model, LoRA, seed and task, over several seeds. Pure module (no
torch).

What is measured per run (one precision, one seed: ``judge``):
- first / final loss: the mean of the first / last ``window`` steps (single steps are
  noisy: every step draws a fresh batch);
- drop: how much the loss fell, (first - final) / first;
- final-loss ratio: final / fp32's final of the same seed (a cell of another training
  stack: plain hf bf16's of the same seed, the same tokens on every stack);
- largest deviation: max |loss - fp32 loss| over the steps both have finite, and where;
- non-finite steps: every step whose loss is NaN or inf, with the first value;
- loss-scaler skips (fp16 and fp16-compute modes): steps GradScaler skipped.
A run's ``problems`` name what that run alone shows (a non-finite loss with its step, the
value and the worker's diagnosis, e.g. "fp16 overflow: activations became inf at step 3
in ..."; a loss that did not fall; a ratio beyond the limit): evidence, not the verdict.

The verdict (``judge_seeds``, one per precision over its seeds; ``harness.core.evidence``):
- ``non-finite``: a loss of any seed was not finite (a hard failure, whatever the others);
- the drop (at least ``min_drop``) and the ratio to fp32 (at most ``max_final_ratio``)
  are each judged against the spread over the seeds: margin = distance of the median
  from the limit, noise = max - min over the seeds. ``stable`` when every margin is on
  the allowed side and larger than its noise (the interval median +- spread lies wholly
  inside the limit), ``unstable`` when one is on the wrong side by more than its noise,
  ``inconclusive`` otherwise: the interval straddles the limit, or fewer than
  ``min_seeds`` seeds ran, so no spread was measured (one seed is always inconclusive);
- ``error`` / ``oom`` / ... when no seed's cell trained.
Each verdict names the weights it was measured on: random initialisation (the synthetic
checkpoint) quantises differently from trained weights with outliers; ``--model PATH``
with a local checkpoint measures real ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from harness.core import evidence as E
from harness.core.fmt import markdown_table

STABLE, UNSTABLE, INCONCLUSIVE, NONFINITE = "stable", "unstable", "inconclusive", "non-finite"


@dataclass(frozen=True)
class Thresholds:
    window: int = 10  # steps averaged for the first / final loss
    min_drop: float = 0.15  # the loss must fall by at least 15% ("clearly falls")
    max_final_ratio: float = 1.25  # final loss at most 25% above fp32's
    min_seeds: int = E.MIN_REPEATS  # fewer seeds measure no spread: no verdict


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
    seed: int | None = None
    weights: str = E.RANDOM_WEIGHTS
    stack: str = "hf"
    reference: str = "fp32"  # what it is compared with: fp32, or "hf bf16" for another stack's cell

    @property
    def compared(self) -> bool:
        """Whether it is judged against a reference (fp32 of the hf stack is the reference)."""
        return not (self.precision == "fp32" and self.stack == "hf")

    @property
    def verdict(self) -> str:
        """This run alone against the fixed limits: evidence for ``judge_seeds``, not the verdict."""
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
    """One precision's record against its reference record (None when it is fp32): fp32
    of the same seed, or for another training stack's cell hf bf16 of the same seed."""
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
            problems.append(f"diverged from {reference_name(rec)}: final loss {_fmt(final)} vs {_fmt(ref_final)} "
                            f"(ratio {final / ref_final:.2f}, limit {th.max_final_ratio}){dev}")
    return StabilityResult(
        cell_id=rec.get("cell_id", "?"), model=rec.get("model") or "?", precision=rec.get("precision") or "?",
        steps=n, status=status, first_loss=first, final_loss=final,
        drop=((first - final) / first) if first and final is not None else None, reference_final_loss=ref_final,
        final_ratio=(final / ref_final) if (final is not None and ref_final) else None,
        max_abs_deviation=max_dev, max_deviation_step=max_dev_step, nonfinite_steps=nonfinite,
        first_nonfinite=(nonfinite[0], _fmt(losses[nonfinite[0]])) if nonfinite else None,
        scaler_skipped_steps=rec.get("scaler_skipped_steps"), loss_scaling=rec.get("loss_scaling"),
        diagnosis=diag, problems=problems, seed=(rec.get("spec") or {}).get("seed"),
        weights=E.weights_label(rec.get("spec")), stack=_stack(rec), reference=reference_name(rec))


def _stack(rec: dict[str, Any]) -> str:
    return str(rec.get("stack") or (rec.get("spec") or {}).get("stack") or "hf")


def reference_name(rec: dict[str, Any]) -> str:
    return "fp32" if _stack(rec) == "hf" else "hf bf16"


def reference_key(rec: dict[str, Any]) -> tuple:
    """Records compared with each other share everything but the precision and the stack."""
    spec = dict(rec.get("spec") or {})
    spec.pop("precision", None)
    spec.pop("stack", None)
    return tuple(sorted((k, str(v)) for k, v in spec.items()))


def judge_all(records: Iterable[dict[str, Any]], th: Thresholds = Thresholds()) -> list[StabilityResult]:
    recs = list(records)
    refs = {(r.get("precision"), reference_key(r)): r for r in recs
            if r.get("precision") in ("fp32", "bf16") and _stack(r) == "hf"}
    out = []
    for r in recs:
        hf = _stack(r) == "hf"
        ref = None if hf and r.get("precision") == "fp32" else refs.get(("fp32" if hf else "bf16", reference_key(r)))
        out.append(judge(r, ref, th))
    return out


@dataclass(frozen=True)
class SeedsVerdict:
    """One precision's verdict over its seeds (see the module docstring)."""

    key: str  # the first seed's cell id
    model: str
    precision: str
    cell_ids: tuple[str, ...]
    seeds: tuple[int | None, ...]
    verdict: str
    weights: str
    drop: E.LimitCheck | None = None
    ratio: E.LimitCheck | None = None
    reasons: tuple[str, ...] = ()

    @property
    def margin(self) -> str:
        """The margins and the noise they were judged against, e.g. "final / fp32 1.247 (one
        seed), limit 1.25: 0.003 inside, noise not measured (...) -> inconclusive"."""
        parts = [c.text() for c in (self.ratio, self.drop) if c is not None] + list(self.reasons)
        return "; ".join(parts) + f" -> {self.verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "model": self.model, "precision": self.precision, "cell_ids": list(self.cell_ids),
                "seeds": list(self.seeds), "verdict": self.verdict, "weights": self.weights,
                "drop": None if self.drop is None else self.drop.to_dict(),
                "ratio": None if self.ratio is None else self.ratio.to_dict(), "reasons": list(self.reasons),
                "margin": self.margin}


def _check_verdict(checks: list[E.LimitCheck]) -> str:
    if any(c.decided and not c.inside for c in checks):
        return UNSTABLE
    return STABLE if checks and all(c.decided and c.inside for c in checks) else INCONCLUSIVE


def judge_seeds(runs: list[StabilityResult], th: Thresholds = Thresholds()) -> SeedsVerdict:
    """One precision's runs, one per seed (each judged against fp32 of its own seed)."""
    first = runs[0]
    ok = [r for r in runs if r.status == "ok"]
    head = dict(key=first.cell_id, model=first.model, precision=_label(first),
                cell_ids=tuple(r.cell_id for r in runs), seeds=tuple(r.seed for r in runs), weights=first.weights)
    failed = tuple(f"{r.cell_id}: {r.status}" for r in runs if r.status != "ok")
    if not ok:
        return SeedsVerdict(verdict=first.status, reasons=failed, **head)
    bad = [r for r in ok if r.nonfinite_steps]
    if bad:  # a hard failure: no spread over the seeds makes a NaN acceptable
        return SeedsVerdict(verdict=NONFINITE, reasons=tuple(f"{r.cell_id}: {'; '.join(r.problems)}" for r in bad),
                            **head)
    drops = [r.drop for r in ok if r.drop is not None]
    drop = E.against_limit("drop", drops, th.min_drop, upper=False, min_repeats=th.min_seeds,
                                                fmt="{:.1%}") if drops else None
    ratio, reasons = None, list(failed)
    if first.compared:
        ratios = [r.final_ratio for r in ok if r.final_ratio is not None]
        if ratios:
            ratio = E.against_limit(f"final / {first.reference}", ratios, th.max_final_ratio, upper=True,
                                     min_repeats=th.min_seeds, fmt="{:.3f}")
        else:
            reasons.append(f"no {first.reference} reference trained")
    checks = [c for c in (drop, ratio) if c is not None]
    verdict = _check_verdict(checks)
    if first.compared and ratio is None:
        verdict = UNSTABLE if verdict == UNSTABLE else INCONCLUSIVE
    return SeedsVerdict(verdict=verdict, drop=drop, ratio=ratio, reasons=tuple(reasons), **head)


def repeat_groups(results: Iterable[StabilityResult], records: Iterable[dict[str, Any]]) -> list[list[StabilityResult]]:
    """Runs that repeat each other with another seed, in first-seen order."""
    groups: dict[tuple, list[StabilityResult]] = {}
    for res, rec in zip(results, records):
        spec = rec.get("spec")
        key = E.repeat_key(spec) if spec else (("cell_id", res.cell_id),)
        groups.setdefault(key, []).append(res)
    return list(groups.values())


def judge_precisions(records: Iterable[dict[str, Any]], th: Thresholds = Thresholds()) -> list[SeedsVerdict]:
    recs = list(records)
    return [judge_seeds(g, th) for g in repeat_groups(judge_all(recs, th), recs)]


def _label(r: StabilityResult) -> str:
    """The precision, with the training stack where it is not plain hf ("bf16 (unsloth)")."""
    return r.precision if r.stack == "hf" else f"{r.precision} ({r.stack})"


def _cell(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _runs_table(results: list[StabilityResult]) -> str:
    head = ["model", "precision", "seed", "steps", "first loss", "final loss", "drop", "final / fp32",
            "largest deviation (step)", "non-finite steps", "scaler skipped"]
    body = []
    for r in results:
        body.append([r.model, _label(r), "-" if r.seed is None else r.seed, r.steps, _cell(r.first_loss),
                     _cell(r.final_loss), _cell(r.drop, "{:.0%}"), _cell(r.final_ratio),
                     f"{r.max_abs_deviation:.3f} ({r.max_deviation_step})" if r.max_abs_deviation is not None else "-",
                     f"{len(r.nonfinite_steps)} (first {r.first_nonfinite[0]}: {r.first_nonfinite[1]})"
                     if r.nonfinite_steps else "0",
                     "-" if r.scaler_skipped_steps is None else r.scaler_skipped_steps])
    return markdown_table(head, body)


def _median_text(check: E.LimitCheck | None, fmt: str) -> str:
    if check is None:
        return "-"
    lo, hi = min(check.values), max(check.values)
    return fmt.format(check.mid) + (f" ({fmt.format(lo)}-{fmt.format(hi)})" if len(check.values) > 1 else "")


def markdown(results: list[StabilityResult], verdicts: list[SeedsVerdict], th: Thresholds = Thresholds(),
             host: str = "") -> str:
    head = ["model", "precision", "weights", "seeds", "final / fp32 (range)", "drop (range)", "verdict",
            "margin (difference vs noise)"]
    body = [[v.model, v.precision, v.weights, len(v.seeds), _median_text(v.ratio, "{:.3f}"),
             _median_text(v.drop, "{:.0%}"), v.verdict, v.margin.replace("|", "/")] for v in verdicts]
    out = [f"# Training stability{(' — ' + host) if host else ''}", "",
           f"Each precision is judged over its seeds, each seed against fp32 of the same seed. First / final loss: "
           f"mean of the first / last {th.window} steps (fewer on short runs). A precision is **non-finite** when "
           f"any seed's loss is not finite. Otherwise its drop (at least {th.min_drop:.0%}) and its final loss over "
           f"fp32's (at most {th.max_final_ratio}x) are judged against the spread over the seeds (noise: max - min): "
           f"**stable** when the median clears each limit by more than the noise, **unstable** when it misses one "
           f"by more than the noise, **inconclusive** when the spread straddles a limit or fewer than "
           f"{th.min_seeds} seeds ran (one seed measures no spread)."
           + (" A cell of another training stack (its precision says which) is compared with plain hf bf16 of the "
              "same seed and tokens instead of fp32: its final / fp32 column holds that ratio."
              if any(r.stack != "hf" for r in results) else ""), "", markdown_table(head, body), "",
           "## Runs", "", _runs_table(results), ""]
    # A non-finite verdict's reasons are its runs' problems, listed next: not twice.
    notes = [f"- {v.key}: {v.verdict}: {v.margin}" for v in verdicts if v.verdict not in (STABLE, NONFINITE)]
    notes += [f"- {r.cell_id}: " + "; ".join(r.problems) for r in results if r.problems]
    out += ["## Findings", ""] + (notes or ["None: every precision trained like fp32."])
    return "\n".join(out) + "\n"


def report(records: Iterable[dict[str, Any]], th: Thresholds = Thresholds(), host: str = "") -> dict[str, Any]:
    """The table's data: ``verdicts`` (one per precision over its seeds), ``rows`` (one per
    run, ``verdict`` its precision's, ``run_verdict`` what the run alone shows) and the curves."""
    recs = list(records)
    results = judge_all(recs, th)
    verdicts = [judge_seeds(g, th) for g in repeat_groups(results, recs)]
    of = {cid: v for v in verdicts for cid in v.cell_ids}
    return {
        "host": host,
        "thresholds": asdict(th),
        "verdicts": [v.to_dict() for v in verdicts],
        "rows": [dict(asdict(r), verdict=of[r.cell_id].verdict, run_verdict=r.verdict) for r in results],
        "curves": {r.get("cell_id"): r.get("losses") for r in recs},
        "markdown": markdown(results, verdicts, th, host),
    }
