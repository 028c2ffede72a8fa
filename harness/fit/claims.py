"""The seed's claims (../shared/SEED.md) as verdicts on measured numbers. Pure module: the
measuring is in ``harness.fit.claims_run``; here each claim is a rule from numbers to a
verdict, with the numbers, the margin the verdict cleared and the noise it was judged
against kept beside it, so a verdict shows why.

Verdicts: ``holds``, ``refuted`` (a finding: the claim is false on this host),
``inconclusive`` (the cells ran but cannot decide: a difference inside the measured noise,
too few seeds to measure any, or both sides at the search's cap), ``skipped`` (this host
cannot measure it, or the claim has nothing to judge in this checkpointing mode: the
reason is given) and ``error`` (a cell the claim needs did not run).

Every claim is judged in every checkpointing mode (``harness.core.axes.GRAD_CKPT_MODES``):
the verdicts differ by mode (e.g. int8 with gc-on keeps activations bf16 frees).

Noise (``harness.core.evidence``): the comparisons (vram-between, faster, more-stable)
take one measurement per seed and side. A comparison decides only when the difference of
the medians (relative to the larger) exceeds the noise: the larger side's repeat spread
(max - min over its seeds, on the same scale) and, for tokens/s, each cell's step-time
spread ((max - min) / median of its measured steps). It needs at least two seeds a side:
one seed measures no noise, so it is ``inconclusive``. Non-finite losses are decided without noise. The budget claims
(fits-2048-24gb, ckpt-extends, 8bit-extends) rest on whether a cell trains under the
budget or runs out of memory; their margin is the headroom or the length step.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from harness.core import evidence as E
from harness.core.axes import GRAD_CKPT_MODES
from harness.core.fmt import markdown_table

GIB = 1024 ** 3
HOLDS, REFUTED, INCONCLUSIVE, SKIPPED, ERROR = "holds", "refuted", "inconclusive", "skipped", "error"
QUANTISED = ("int8", "nf4")


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the seed's words
    test: str  # what is measured and the criterion
    needs_gpu: bool


CLAIMS: dict[str, Claim] = {c.key: c for c in (
    Claim("vram-between", "16-bit LoRA's VRAM use lies between full precision (fp32) and 8-bit quantisation",
          "NVML peak of fp32 > bf16 > int8 on the same cell (same model, length, checkpointing, weights), each "
          "difference larger than the peaks' repeat spread over the seeds", True),
    Claim("faster", "16-bit LoRA is usually faster than low-bit quantised training",
          "tokens/s of bf16 > tokens/s of int8 and of nf4 on the same cell, each difference larger than the repeat "
          "spread over the seeds and the cells' step-time spread", False),
    Claim("more-stable", "16-bit LoRA trains more stably than quantised LoRA",
          "same base weights and data, per seed: bf16 has no non-finite loss, and its loss curve stays closer to "
          "fp32's of the same seed (mean |difference| over all steps) than each quantised mode's, by more than the "
          "repeat spread over the seeds", False),
    Claim("fits-2048-24gb", "a ~7B model with 16-bit LoRA fits sequences of up to 2048 tokens on a 24 GB GPU",
          "a bf16 cell of 2048 tokens trains under a 24 GiB budget", True),
    Claim("ckpt-extends", "gradient checkpointing extends the usable sequence length further (16-bit, 24 GB)",
          "bf16 without checkpointing fails at the longest length bf16 with checkpointing trains at 24 GiB "
          "(nothing to judge in gc-off, the mode it is compared with)", True),
    Claim("8bit-extends", "for longer sequences, 8-bit quantisation extends it further (24 GB)",
          "int8 trains one step beyond the longest length bf16 trains at 24 GiB (same checkpointing)", True),
)}


@dataclass(frozen=True)
class Verdict:
    claim: str
    variant: str
    verdict: str
    summary: str
    numbers: dict[str, Any] = field(default_factory=dict)
    grad_ckpt: str = ""
    margin: str = ""  # the difference the verdict rests on and the noise it was judged against
    weights: str = ""  # numerics claims: what the base weights were

    @property
    def passed(self) -> bool:
        return self.verdict == HOLDS

    def to_dict(self) -> dict[str, Any]:
        c = CLAIMS[self.claim]
        return {"claim": self.claim, "variant": self.variant, "grad_ckpt": self.grad_ckpt, "text": c.text,
                "test": c.test, "verdict": self.verdict, "summary": self.summary, "margin": self.margin,
                "weights": self.weights, "numbers": self.numbers}


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _per_seed(v: Any) -> list:
    """One value per seed: a bare number is one seed's."""
    return [v] if isinstance(v, (int, float, str)) else list(v)


def _outcome(cmps: Sequence[E.Comparison], wrong: Sequence[bool]) -> str:
    """holds when every comparison decides the right way; refuted when one decides the
    wrong way; inconclusive otherwise."""
    if any(c.decided and w for c, w in zip(cmps, wrong)):
        return REFUTED
    return HOLDS if all(c.decided and not w for c, w in zip(cmps, wrong)) else INCONCLUSIVE


def judge_vram_between(peaks: Mapping[str, Any], variant: str = "", grad_ckpt: str = "") -> Verdict:
    """``peaks``: NVML peak bytes of fp32, bf16, int8 on the same cell, one per seed."""
    per = {k: E.finite(_per_seed(v)) for k, v in peaks.items()}
    missing = [k for k in ("fp32", "bf16", "int8") if not per.get(k)]
    if missing:  # e.g. --nvml-period-ms 0: no peak was sampled
        return Verdict("vram-between", variant, ERROR, f"no NVML peak recorded for {', '.join(missing)}",
                       {"nvml_peak_bytes": dict(peaks)}, grad_ckpt=grad_ckpt)
    cmps = [E.compare("fp32", per["fp32"], "bf16", per["bf16"]), E.compare("bf16", per["bf16"], "int8", per["int8"])]
    wrong = [c.a_mid <= c.b_mid for c in cmps]
    verdict = _outcome(cmps, wrong)
    mids = {k: statistics.median(v) for k, v in per.items()}
    order = " > ".join(f"{k} {_gib(v)}" for k, v in sorted(mids.items(), key=lambda kv: -kv[1]))
    n = min(len(v) for v in per.values())
    why = {REFUTED: " (bf16 is not strictly between fp32 and int8)", HOLDS: ""}.get(verdict, " (inside the noise)")
    return Verdict("vram-between", variant, verdict, f"NVML peaks{_over(n)}: {order}{why}",
                   {"nvml_peak_bytes": {k: v[0] if len(v) == 1 else v for k, v in per.items()},
                    "comparisons": [c.to_dict() for c in cmps]},
                   grad_ckpt=grad_ckpt, margin="; ".join(c.text(_gib) for c in cmps) + f" -> {verdict}")


def _over(n: int) -> str:
    return "" if n == 1 else f" (median of {n} seeds)"


def judge_faster(tokens_per_s: Mapping[str, Any], variant: str = "", grad_ckpt: str = "",
                 step_spread: Mapping[str, Sequence[float | None]] | None = None) -> Verdict:
    """``tokens_per_s``: per precision, one value per seed; ``step_spread``: per precision,
    each cell's step-time spread ((max - min) / median of its measured steps)."""
    per = {k: E.finite(_per_seed(v)) for k, v in tokens_per_s.items()}
    spread = {k: max(E.finite(v), default=None) for k, v in (step_spread or {}).items()}
    quant = [k for k in per if k not in ("bf16", "fp32")]
    cmps = [E.compare("bf16", per["bf16"], q, per[q],
                      extra_noise={f"step-time spread of {p}": spread.get(p) for p in ("bf16", q)}) for q in quant]
    wrong = [c.a_mid <= c.b_mid for c in cmps]
    verdict = _outcome(cmps, wrong)
    slower = [c.b for c, w in zip(cmps, wrong) if c.decided and w]
    text = ", ".join(f"{k} {statistics.median(v):,.0f}" for k, v in per.items())
    n = min(len(v) for v in per.values())
    why = f" (bf16 not faster than {', '.join(slower)})" if slower else ("" if verdict == HOLDS else
                                                                          " (inside the noise)")
    return Verdict("faster", variant, verdict, f"tokens/s{_over(n)}: {text}{why}",
                   {"tokens_per_s": {k: v[0] if len(v) == 1 else v for k, v in per.items()},
                    "step_time_spread": spread, "comparisons": [c.to_dict() for c in cmps]},
                   grad_ckpt=grad_ckpt, margin="; ".join(c.text("{:,.0f}") for c in cmps) + f" -> {verdict}")


def _floats(curve: Sequence[Any]) -> list[float]:
    out = []
    for x in curve:
        try:
            out.append(float(x))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def mean_abs_dev(curve: Sequence[float], ref: Sequence[float]) -> float:
    """Mean |loss - fp32 loss| over the steps both have; inf when ``curve`` is not finite there."""
    n = min(len(curve), len(ref))
    if not n or not all(math.isfinite(x) for x in curve[:n]):
        return math.inf
    return sum(abs(curve[i] - ref[i]) for i in range(n)) / n


def _curves(losses: Mapping[str, Any]) -> dict[str, list[list[float]]]:
    """Per precision, one loss curve per seed (a bare curve is one seed's)."""
    out = {}
    for k, v in losses.items():
        v = list(v)
        one = not v or not isinstance(v[0], (list, tuple))
        out[k] = [_floats(c) for c in ([v] if one else v)]
    return out


def judge_more_stable(losses: Mapping[str, Any], variant: str = "", grad_ckpt: str = "",
                      weights: str = E.RANDOM_WEIGHTS) -> Verdict:
    """``losses``: per precision (fp32, bf16, quantised modes), one per-step loss curve per
    seed (warm-up included; the same seeds in the same order on every side). Non-finite
    values may arrive as the strings "nan" / "inf" (the JSON form)."""
    curves = _curves(losses)
    ref = curves["fp32"]
    nonfinite = {k: sum(1 for c in v for x in c if not math.isfinite(x)) for k, v in curves.items()}
    kw = dict(grad_ckpt=grad_ckpt, weights=weights)
    if nonfinite["fp32"] or not ref or not all(ref):
        return Verdict("more-stable", variant, INCONCLUSIVE, "the fp32 reference itself has non-finite losses",
                       {"nonfinite": nonfinite}, margin="no finite fp32 curve to measure against", **kw)
    dev = {k: [mean_abs_dev(c, r) for c, r in zip(v, ref)] for k, v in curves.items() if k != "fp32"}
    quant = [k for k in dev if k != "bf16"]
    cmps, lines, worse, undecided = [], [], [], []
    for q in quant:
        if not all(math.isfinite(d) for d in dev[q]):  # the quantised mode's loss went non-finite
            lines.append(f"{q} had non-finite losses -> bf16 closer")
            continue
        if not all(math.isfinite(d) for d in dev["bf16"]):
            continue
        c = E.compare("bf16", dev["bf16"], q, dev[q])
        cmps.append(c)
        lines.append(c.text())
        if not c.decided:
            undecided.append(q)
        elif c.b_mid < c.a_mid:
            worse.append(q)
    if nonfinite["bf16"]:
        verdict, why = REFUTED, f" (bf16 had {nonfinite['bf16']} non-finite losses)"
        lines.insert(0, f"bf16 had {nonfinite['bf16']} non-finite losses")
    elif worse:
        verdict, why = REFUTED, f" ({', '.join(worse)} closer to fp32 than bf16)"
    elif undecided:
        verdict, why = INCONCLUSIVE, f" ({', '.join(undecided)}: inside the noise)"
    else:
        verdict, why = HOLDS, ""
    mids = {k: statistics.median(v) for k, v in dev.items()}
    text = ", ".join(f"{k} {d:.4f}" if math.isfinite(d) else f"{k} non-finite" for k, d in mids.items())
    n = len(ref)
    return Verdict("more-stable", variant, verdict,
                   f"mean abs(loss - fp32 loss) over the steps{_over(n)}: {text}; non-finite: {nonfinite}{why}",
                   {"mean_abs_dev_from_fp32": {k: (d if math.isfinite(d) else None) for k, d in mids.items()},
                    "per_seed": {k: [d if math.isfinite(d) else None for d in v] for k, v in dev.items()},
                    "nonfinite": nonfinite, "seeds": n, "comparisons": [c.to_dict() for c in cmps],
                    "final_loss": {k: [c[-1] if c else None for c in v] for k, v in curves.items()}},
                   margin="; ".join(lines) + f" -> {verdict}", **kw)


def judge_fits(fits: bool, variant: str, evidence: str, grad_ckpt: str = "", margin: str = "") -> Verdict:
    return Verdict("fits-2048-24gb", variant, HOLDS if fits else REFUTED,
                   ("trains" if fits else "runs out of memory") + f": {evidence}", {"fits": fits, "evidence": evidence},
                   grad_ckpt=grad_ckpt, margin=margin)


def judge_extends(claim: str, variant: str, *, base_longest: int | None, base_status: str,
                  other_fits_beyond: bool | None, probe_len: int | None, evidence: str, grad_ckpt: str = "",
                  margin: str = "") -> Verdict:
    """Does the ``other`` configuration train past the base configuration's longest length?

    ``ckpt-extends``: base = with checkpointing, other = without; it extends when the
    other *fails* at the base's longest (so the claim holds when ``other_fits_beyond`` is
    False there). ``8bit-extends``: base = bf16, other = int8 one step beyond; holds when
    it fits. The caller passes ``other_fits_beyond`` with that meaning already applied.
    """
    nums = {"base_longest": base_longest, "base_status": base_status, "probe_seq_len": probe_len,
            "other_fits": other_fits_beyond, "evidence": evidence}
    kw = dict(grad_ckpt=grad_ckpt, margin=margin)
    if base_status == "at_cap":
        return Verdict(claim, variant, INCONCLUSIVE, f"the base reached the search cap ({base_longest}); {evidence}",
                       nums, **kw)
    if other_fits_beyond is None:
        return Verdict(claim, variant, ERROR, f"not measured: {evidence}", nums, **kw)
    holds = other_fits_beyond if claim == "8bit-extends" else not other_fits_beyond
    return Verdict(claim, variant, HOLDS if holds else REFUTED, evidence, nums, **kw)


def skipped(claim: str, variant: str, reason: str, grad_ckpt: str = "") -> Verdict:
    return Verdict(claim, variant, SKIPPED, reason, grad_ckpt=grad_ckpt)


MARKS = {HOLDS: "holds", REFUTED: "**REFUTED**", INCONCLUSIVE: "inconclusive", SKIPPED: "skipped",
         ERROR: "error (not measured)"}
HEADERS = ["claim (../shared/SEED.md)", "checkpointing", "verdict", "margin (difference vs noise)", "weights",
           "the numbers"]


def table_rows(verdicts: Sequence[Verdict]) -> list[list[str]]:
    """One row per claim x checkpointing mode, in ``HEADERS``' order."""
    rows = []
    for v in verdicts:
        c = CLAIMS[v.claim]
        rows.append([c.text + (f" [{v.variant}]" if v.variant else ""), f"gc-{v.grad_ckpt}" if v.grad_ckpt else "-",
                     MARKS[v.verdict], (v.margin or "-").replace("|", "/"), v.weights or "-",
                     v.summary.replace("|", "/")])
    return rows


def by_mode_rows(verdicts: Sequence[Verdict]) -> tuple[list[str], list[list[str]]]:
    """The overview: one row per claim, one column per checkpointing mode (several
    verdicts of a claim in one mode, e.g. two lengths, are joined)."""
    modes = list(GRAD_CKPT_MODES) + sorted({v.grad_ckpt for v in verdicts} - set(GRAD_CKPT_MODES) - {""})
    rows = []
    for key, c in CLAIMS.items():
        mine = [v for v in verdicts if v.claim == key]
        if mine:
            rows.append([c.text] + [", ".join(MARKS[v.verdict] for v in mine if v.grad_ckpt == m) or "-"
                                    for m in modes])
    return ["claim (../shared/SEED.md)"] + [f"gc-{m}" for m in modes], rows


def markdown(verdicts: Sequence[Verdict], title: str) -> str:
    n = {k: sum(1 for v in verdicts if v.verdict == k) for k in (HOLDS, REFUTED, INCONCLUSIVE, SKIPPED, ERROR)}
    head, overview = by_mode_rows(verdicts)
    lines = [f"# {title}", "", ", ".join(f"{c} {k}" for k, c in n.items() if c) + ".", "",
             "## Verdicts by checkpointing mode", "", markdown_table(head, overview), "",
             "## The numbers", "", markdown_table(HEADERS, table_rows(verdicts)), "",
             "## How each claim is tested", ""]
    lines += [f"- **{c.key}**: {c.test}." for c in CLAIMS.values()]
    lines += ["", "A comparison is decided only when the difference of the medians over the seeds (relative to "
                  "the larger) is larger than the noise measured beside it: the larger side's repeat spread (max - "
                  "min over the seeds, on the same scale) and, for tokens/s, each cell's step-time spread ((max - "
                  "min) / median of its measured steps). With one seed no noise is measured and the comparison is "
                  "inconclusive. Non-finite losses decide without noise. The budget claims rest on whether a cell "
                  "trains under the budget or runs out of memory.",
              "", "Random initialisation quantises differently from trained weights with outliers: a verdict about "
                  f"numerics names the weights it was measured on ({E.RANDOM_WEIGHTS} unless `--model PATH` gave a "
                  "local checkpoint)."]
    return "\n".join(lines) + "\n"


def to_json(verdicts: Sequence[Verdict]) -> str:
    return json.dumps([v.to_dict() for v in verdicts], indent=2, default=str)
