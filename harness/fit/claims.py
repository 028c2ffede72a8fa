"""The seed's claims (../shared/SEED.md) as verdicts on measured numbers. Pure module: the
measuring is in ``harness.fit.claims_run``; here each claim is a rule from numbers to
holds / refuted, with the numbers kept beside the verdict so a refutation shows why.

Verdicts: ``holds``, ``refuted`` (a finding: the claim is false on this host),
``inconclusive`` (the cells ran but cannot decide, e.g. both sides reached the search's
cap), ``skipped`` (this host cannot measure it: the reason is given) and ``error`` (a
cell the claim needs did not run).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from harness.core.fmt import markdown_table

GIB = 1024 ** 3
HOLDS, REFUTED, INCONCLUSIVE, SKIPPED, ERROR = "holds", "refuted", "inconclusive", "skipped", "error"


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the seed's words
    test: str  # what is measured and the criterion
    needs_gpu: bool


CLAIMS: dict[str, Claim] = {c.key: c for c in (
    Claim("vram-between", "16-bit LoRA's VRAM use lies between full precision (fp32) and 8-bit quantisation",
          "NVML peak of fp32 > bf16 > int8 on the same cell (same model, length, checkpointing, weights)", True),
    Claim("faster", "16-bit LoRA is usually faster than low-bit quantised training",
          "tokens/s of bf16 > tokens/s of int8 and of nf4 on the same cell", False),
    Claim("more-stable", "16-bit LoRA trains more stably than quantised LoRA",
          "same base weights, data and seed: bf16 has no non-finite loss, and its loss curve stays at least as "
          "close to fp32's (mean |difference| over all steps) as each quantised mode's", False),
    Claim("fits-2048-24gb", "a ~7B model with 16-bit LoRA fits sequences of up to 2048 tokens on a 24 GB GPU",
          "a bf16 cell of 2048 tokens trains under a 24 GiB budget", True),
    Claim("ckpt-extends", "gradient checkpointing extends the usable sequence length further (16-bit, 24 GB)",
          "bf16 without checkpointing fails at the longest length bf16 with checkpointing trains at 24 GiB", True),
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

    @property
    def passed(self) -> bool:
        return self.verdict == HOLDS

    def to_dict(self) -> dict[str, Any]:
        c = CLAIMS[self.claim]
        return {"claim": self.claim, "variant": self.variant, "text": c.text, "test": c.test,
                "verdict": self.verdict, "summary": self.summary, "numbers": self.numbers}


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def judge_vram_between(peaks: dict[str, int], variant: str = "") -> Verdict:
    """``peaks``: NVML peak bytes for fp32, bf16, int8 on the same cell."""
    f, b, i = peaks["fp32"], peaks["bf16"], peaks["int8"]
    ok = f > b > i
    order = " > ".join(f"{k} {_gib(v)}" for k, v in sorted(peaks.items(), key=lambda kv: -kv[1]))
    return Verdict("vram-between", variant, HOLDS if ok else REFUTED,
                   f"NVML peaks: {order}" + ("" if ok else " (bf16 is not strictly between fp32 and int8)"),
                   {"nvml_peak_bytes": peaks})


def judge_faster(tokens_per_s: dict[str, float], variant: str = "") -> Verdict:
    b = tokens_per_s["bf16"]
    quant = {k: v for k, v in tokens_per_s.items() if k not in ("bf16", "fp32")}
    slower = [k for k, v in quant.items() if v >= b]
    text = ", ".join(f"{k} {v:,.0f}" for k, v in tokens_per_s.items())
    return Verdict("faster", variant, REFUTED if slower else HOLDS,
                   f"tokens/s: {text}" + (f" (bf16 not faster than {', '.join(slower)})" if slower else ""),
                   {"tokens_per_s": tokens_per_s})


def _finite(xs: Sequence[float]) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def judge_more_stable(losses: dict[str, Sequence[float]], variant: str = "") -> Verdict:
    """``losses``: per-step losses (warm-up included) of fp32, bf16 and quantised modes.
    Non-finite values may arrive as the strings "nan" / "inf" (the JSON form)."""
    clean = {k: [float(x) for x in v] for k, v in losses.items()}
    ref = clean["fp32"]
    nonfinite = {k: sum(1 for x in v if not math.isfinite(x)) for k, v in clean.items()}
    if nonfinite["fp32"] or not ref:
        return Verdict("more-stable", variant, INCONCLUSIVE, "the fp32 reference itself has non-finite losses",
                       {"nonfinite": nonfinite})
    dev = {}
    for k, v in clean.items():
        if k == "fp32":
            continue
        n = min(len(v), len(ref))
        dev[k] = (sum(abs(v[i] - ref[i]) for i in range(n)) / n) if (n and _finite(v[:n])) else math.inf
    b = dev["bf16"]
    worse = [k for k, d in dev.items() if k != "bf16" and d < b]
    ok = nonfinite["bf16"] == 0 and not worse
    final = {k: (v[-1] if v else None) for k, v in clean.items()}
    text = ", ".join(f"{k} {d:.4f}" if math.isfinite(d) else f"{k} non-finite" for k, d in dev.items())
    why = "" if ok else (f" (bf16 had {nonfinite['bf16']} non-finite losses)" if nonfinite["bf16"]
                         else f" ({', '.join(worse)} closer to fp32 than bf16)")
    return Verdict("more-stable", variant, HOLDS if ok else REFUTED,
                   f"mean abs(loss - fp32 loss) over the steps: {text}; non-finite: {nonfinite}{why}",
                   {"mean_abs_dev_from_fp32": {k: (d if math.isfinite(d) else None) for k, d in dev.items()},
                    "nonfinite": nonfinite, "final_loss": final})


def judge_fits(fits: bool, variant: str, evidence: str) -> Verdict:
    return Verdict("fits-2048-24gb", variant, HOLDS if fits else REFUTED,
                   ("trains" if fits else "runs out of memory") + f": {evidence}", {"fits": fits, "evidence": evidence})


def judge_extends(claim: str, variant: str, *, base_longest: int | None, base_status: str,
                  other_fits_beyond: bool | None, probe_len: int | None, evidence: str) -> Verdict:
    """Does the ``other`` configuration train past the base configuration's longest length?

    ``ckpt-extends``: base = with checkpointing, other = without; it extends when the
    other *fails* at the base's longest (so the claim holds when ``other_fits_beyond`` is
    False there). ``8bit-extends``: base = bf16, other = int8 one step beyond; holds when
    it fits. The caller passes ``other_fits_beyond`` with that meaning already applied.
    """
    nums = {"base_longest": base_longest, "base_status": base_status, "probe_seq_len": probe_len,
            "other_fits": other_fits_beyond, "evidence": evidence}
    if base_status == "at_cap":
        return Verdict(claim, variant, INCONCLUSIVE, f"the base reached the search cap ({base_longest}); {evidence}",
                       nums)
    if other_fits_beyond is None:
        return Verdict(claim, variant, ERROR, f"not measured: {evidence}", nums)
    holds = other_fits_beyond if claim == "8bit-extends" else not other_fits_beyond
    return Verdict(claim, variant, HOLDS if holds else REFUTED, evidence, nums)


def skipped(claim: str, variant: str, reason: str) -> Verdict:
    return Verdict(claim, variant, SKIPPED, reason)


def table_rows(verdicts: Sequence[Verdict]) -> list[list[str]]:
    rows = []
    for v in verdicts:
        c = CLAIMS[v.claim]
        mark = {HOLDS: "holds", REFUTED: "**REFUTED**", INCONCLUSIVE: "inconclusive", SKIPPED: "skipped",
                ERROR: "error (not measured)"}[v.verdict]
        rows.append([c.text + (f" [{v.variant}]" if v.variant else ""), mark, v.summary.replace("|", "/")])
    return rows


def markdown(verdicts: Sequence[Verdict], title: str) -> str:
    n = {k: sum(1 for v in verdicts if v.verdict == k) for k in (HOLDS, REFUTED, INCONCLUSIVE, SKIPPED, ERROR)}
    lines = [f"# {title}", "", ", ".join(f"{c} {k}" for k, c in n.items() if c) + ".", "",
             markdown_table(["claim (../shared/SEED.md)", "verdict", "the numbers"], table_rows(verdicts)), "",
             "## How each claim is tested", ""]
    lines += [f"- **{c.key}**: {c.test}." for c in CLAIMS.values()]
    return "\n".join(lines) + "\n"


def to_json(verdicts: Sequence[Verdict]) -> str:
    return json.dumps([v.to_dict() for v in verdicts], indent=2, default=str)
