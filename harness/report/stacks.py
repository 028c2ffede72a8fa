"""Stack against stack: the same cells on hf, Liger and Unsloth, and each vendor's claim
beside what was measured. Pure module (pandas; no torch).

Cells are compared when they differ only by their stack (their ids are equal once the
``/stack-<name>`` part is dropped) and ran on the same device: for each model x
precision x length x checkpointing mode, tokens/s and peak VRAM, each relative to the hf
cell; the longest context at 24 GiB where a fit search answered it (``fit.json`` rows);
and the loss against plain hf bf16 (the mean absolute difference of the two loss curves,
step by step: the cells share tokens and seed).

Each vendor's published claim is quoted with its source, and a verdict says whether the
cells confirm it:

- speed: the ratio of tokens/s is read as a band from the slowest and fastest measured
  steps of both cells (``step_times_s``). confirms: the whole band is at or above the
  claimed factor; does not confirm: the whole band is below it; cannot tell: the claim
  lies inside the band (the cells' noise), or a cell's steps are unstable
  (``harness.core.steps.is_stable``) or too few to judge;
- memory: the saving 1 - VRAM(stack) / VRAM(hf) of NVML's peaks, one measurement per
  cell: confirms at or above the claimed saving, does not confirm more than
  ``MEMORY_TOLERANCE`` below it, cannot tell in between or without VRAM figures.

The claims are about their own settings (Unsloth against Hugging Face + Flash Attention 2,
mostly QLoRA; Liger on several GPUs): a "does not confirm" says what these cells show,
not that the claim is false where it was made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness.core import steps
from harness.core.axes import STACK_NAMES, ordered
from harness.core.budget import GIB
from harness.report.units import fmt

MEMORY_TOLERANCE = 0.02  # of the device's peak: NVML sampling and allocator rounding
FIT_BUDGET_BYTES = 24 * GIB
CONFIRMS, NOT_CONFIRMED, CANNOT_TELL = "confirms", "does not confirm", "cannot tell"


@dataclass(frozen=True)
class Claim:
    stack: str
    quote: str  # verbatim
    source: str
    speedup: float  # tokens/s factor claimed over the baseline
    memory_saved: float  # fraction of peak memory claimed saved
    scope: str  # what the claim was measured on, as its source says


CLAIMS: dict[str, Claim] = {
    "unsloth": Claim(
        "unsloth", "Train LLMs, diffusion, decision, TTS, and embedding models 2× faster with 70% less VRAM with "
        "no accuracy loss",
        "unsloth 2026.10.9 README (PyPI long description; https://github.com/unslothai/unsloth#readme); its "
        "notebook table lists Llama 3.1 (8B) Alpaca at \"2x faster\", \"70% less\"", 2.0, 0.70,
        "against Hugging Face + Flash Attention 2; its notebooks are mostly 4-bit QLoRA"),
    "liger": Claim(
        "liger", "It can effectively increase multi-GPU training throughput by 20% and reduces memory usage by 60%.",
        "liger-kernel 0.8.5 README (PyPI long description; https://github.com/linkedin/Liger-Kernel#readme)",
        1.20, 0.60, "multi-GPU training (its examples: LLaMA 3-8B on 4-8 A100s with FSDP / DeepSpeed)"),
}


def base_id(cell_id: str) -> str:
    """The cell's id without its stack: cells of one base id differ only by stack."""
    return re.sub(r"/stack-[A-Za-z0-9_.-]+(?=/|$)", "", str(cell_id))


def _reference_id(cell_id: str) -> str:
    """The plain hf bf16 cell of the same model, length and mode (the loss reference)."""
    parts = base_id(cell_id).split("/")
    parts[1] = "bf16"
    return "/".join(parts)


def _tps_band(r: pd.Series) -> tuple[float, float] | None:
    times = [float(t) for t in (r.get("step_times_s") or []) if isinstance(t, (int, float)) and t > 0]
    tokens = r.get("tokens_per_step")
    if not times or not isinstance(tokens, (int, float)) or tokens != tokens:
        return None
    return float(tokens) / max(times), float(tokens) / min(times)


def speed_verdict(claim: float, cell: pd.Series, hf: pd.Series) -> tuple[str, str]:
    """(verdict, why) for a claimed tokens/s factor over the hf cell."""
    a, b = _tps_band(cell), _tps_band(hf)
    if a is None or b is None:
        return CANNOT_TELL, "no measured steps"
    stable = [steps.is_stable({"step_times_s": list(r.get("step_times_s") or []), "stable": r.get("stable")})
              for r in (cell, hf)]
    lo, hi = a[0] / b[1], a[1] / b[0]
    band = f"steps x{lo:.2f}-x{hi:.2f}"
    if any(s is not True for s in stable):
        return CANNOT_TELL, f"{band}; " + ("unstable steps" if False in stable else "too few steps to judge")
    if lo >= claim:
        return CONFIRMS, band
    if hi < claim:
        return NOT_CONFIRMED, band
    return CANNOT_TELL, f"{band}: x{claim:g} is inside the noise"


def memory_verdict(claim: float, cell: pd.Series, hf: pd.Series) -> tuple[str, str]:
    if not (cell.get("memory_kind") == hf.get("memory_kind") == "VRAM"):
        return CANNOT_TELL, "no VRAM measured"
    saved = 1.0 - float(cell["memory_bytes"]) / float(hf["memory_bytes"])
    if saved >= claim:
        return CONFIRMS, f"{saved:.0%} less"
    if saved < claim - MEMORY_TOLERANCE:
        return NOT_CONFIRMED, f"{saved:.0%} less" if saved >= 0 else f"{-saved:.0%} more"
    return CANNOT_TELL, f"{saved:.0%} less, within {MEMORY_TOLERANCE:.0%} of the claim"


def fit_longest(fit_rows: list[dict[str, Any]], r: pd.Series, budget: int = FIT_BUDGET_BYTES) -> str | None:
    """The fit search's measured answer for the cell's row at ``budget`` ("8,192",
    ">=16,384 (cap)", "OOM"), or None where no search answered it."""
    found = None
    for row in fit_rows:
        spec_like = (row.get("model"), row.get("precision"), row.get("grad_ckpt"), row.get("stack") or "hf",
                     int(row.get("batch_size") or 1))
        if spec_like != (r["model"], r["precision"], r["grad_ckpt"], r.get("stack") or "hf",
                         int(r.get("batch_size") or 1)):
            continue
        for a in row.get("answers") or ():
            if a.get("budget_bytes") == budget and a.get("status") in ("found", "at_cap", "oom"):
                found = ("OOM" if a["status"] == "oom" else f"{a['longest']:,}" if a["status"] == "found"
                         else f">={row.get('max_seq_len'):,} (cap)")
    return found


def _loss_gap(cell: pd.Series, ref: pd.Series | None) -> str:
    if ref is None:
        return "no hf bf16 cell"
    if ref["cell_id"] == cell["cell_id"]:
        return "reference"
    a = [x for x in (cell.get("losses") or []) if x == x]
    b = [x for x in (ref.get("losses") or []) if x == x]
    n = min(len(a), len(b))
    if not n or (cell.get("spec") or {}).get("seed") != (ref.get("spec") or {}).get("seed"):
        return "not comparable"
    gap = sum(abs(x - y) for x, y in zip(a[:n], b[:n])) / n
    mean = sum(b[:n]) / n
    return f"{gap:.4f} ({gap / mean:.2%})" if mean else f"{gap:.4f}"


def _ratio(value: float, hf_value: float, *, as_saving: bool = False) -> str:
    if not (value == value and hf_value == hf_value and hf_value):
        return "-"
    if as_saving:
        d = value / hf_value - 1.0
        return "=" if abs(d) < 0.005 else f"{d:+.0%}"
    return f"x{value / hf_value:.2f}"


def comparisons(cells: pd.DataFrame) -> list[tuple[pd.Series, pd.Series, pd.Series | None]]:
    """(cell, its hf cell, the hf bf16 loss reference) for every ok cell of a base id that
    has an ok hf cell and at least one other stack, stacks in the registry's order."""
    ok = cells[cells["status"] == "ok"].copy()
    if ok.empty:
        return []
    ok["stack"] = ok["stack"].fillna("hf") if "stack" in ok.columns else "hf"
    ok["_base"] = ok["cell_id"].map(base_id)
    by_id = {(r["device_label"], r["cell_id"]): r for _, r in ok.iterrows()}
    out = []
    for (_dev, _base), g in ok.groupby(["device_label", "_base"], sort=False):
        hf = g[g["stack"] == "hf"]
        if hf.empty or g["stack"].nunique() < 2:
            continue
        hf_row = hf.iloc[-1]
        for st in ordered(g["stack"], STACK_NAMES):
            r = g[g["stack"] == st].iloc[-1]
            out.append((r, hf_row, by_id.get((r["device_label"], _reference_id(r["cell_id"])))))
    return out


HEADERS = ["model", "precision", "tokens", "checkpointing", "stack", "tokens/s", "tokens/s vs hf", "peak VRAM",
           "VRAM vs hf", "longest at 24 GiB", "longest vs hf", "loss vs hf bf16 (mean |diff|)", "vendor claim",
           "verdict"]


def table(cells: pd.DataFrame, fit_rows: list[dict[str, Any]] | None = None) -> tuple[list[str], list[list[str]]]:
    """The stack-vs-stack table: one row per compared cell (hf rows are the baseline)."""
    rows = []
    for r, hf, ref in comparisons(cells):
        claim = CLAIMS.get(r["stack"])
        longest, hf_longest = fit_longest(fit_rows or [], r), fit_longest(fit_rows or [], hf)
        verdict = "-"
        if claim is not None:
            sv, sw = speed_verdict(claim.speedup, r, hf)
            mv, mw = memory_verdict(claim.memory_saved, r, hf)
            verdict = f"speed: {sv} ({sw}); memory: {mv} ({mw})"
        rows.append([str(r["model"]), str(r["precision"]), f"{int(r['seq_len']):,}", f"gc-{r['grad_ckpt']}",
                     str(r["stack"]), f"{r['tokens_per_s']:,.0f}", _ratio(r["tokens_per_s"], hf["tokens_per_s"]),
                     fmt("peak_vram_bytes", r["memory_bytes"]),
                     _ratio(r["memory_bytes"], hf["memory_bytes"], as_saving=True),
                     longest or "-", _longest_ratio(longest, hf_longest), _loss_gap(r, ref),
                     "-" if claim is None else f"x{claim.speedup:g} tokens/s, {claim.memory_saved:.0%} less memory",
                     verdict])
    return HEADERS, rows


def _longest_ratio(a: str | None, b: str | None) -> str:
    try:
        return f"x{int(a.replace(',', '')) / int(b.replace(',', '')):.2f}"
    except (AttributeError, ValueError, ZeroDivisionError):
        return "-"


def claims_table(cells: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Each vendor claim, quoted, with its source and how the compared cells judge it."""
    tallies: dict[str, dict[str, int]] = {}
    for r, hf, _ref in comparisons(cells):
        claim = CLAIMS.get(r["stack"])
        if claim is None:
            continue
        t = tallies.setdefault(claim.stack, {})
        for v in (speed_verdict(claim.speedup, r, hf)[0], memory_verdict(claim.memory_saved, r, hf)[0]):
            t[v] = t.get(v, 0) + 1
    rows = []
    for name, claim in CLAIMS.items():
        t = tallies.get(name)
        seen = "no compared cells" if not t else ", ".join(f"{v}: {t[v]}" for v in (CONFIRMS, NOT_CONFIRMED,
                                                                                     CANNOT_TELL) if t.get(v))
        rows.append([name, f"\"{claim.quote}\"", claim.source, claim.scope, seen])
    return ["stack", "claim (quoted)", "source", "measured on", "verdicts here (speed + memory, per cell)"], rows
