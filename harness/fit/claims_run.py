"""Measuring the seed's claims: which cells each claim needs, reusing the fit search's
cells and every record of the run folder. Parent side (no torch); the verdict rules are
in ``harness.fit.claims``.

The cells:
- comparisons (vram-between, faster, more-stable): fp32 / bf16 / int8 / nf4 at 2048
  tokens with the article's checkpointing (``offload``, Unsloth's "unsloth"), all loaded
  through ``from_pretrained`` from the same synthetic checkpoint (``load=pretrained``) so
  every precision starts from the same base weights, with the default steps (2 warm-up +
  5 measured): the same ids as the matrix's, so a matrix run's records are reused;
- budget claims (24 GiB): answers and probes of :class:`harness.fit.search.FitSearch`,
  whose records (from ``suites/test_fit.py`` or ``lora-harness fit`` in the same run
  folder) decide as much as they can before any new cell runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from harness.fit import claims as C
from harness.core.budget import GIB, budget_label
from harness.fit.search import FitSearch, probe_cell
from harness.core.spec import CellSpec

SEQ_LEN = 2048
GRAD_CKPT = "offload"
BUDGET_BYTES = 24 * GIB
COMPARED = ("fp32", "bf16", "int8", "nf4")


@dataclass
class ClaimsContext:
    template: CellSpec  # model, LoRA, optimizer, seed of the session
    measure: Callable[[CellSpec], dict[str, Any]]
    search: FitSearch
    use_gpu: bool
    device_total_bytes: int | None = None
    verdicts: list[C.Verdict] = field(default_factory=list)
    _cmp: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- cells -----------------------------------------------------------------------
    def comparison_cell(self, precision: str) -> CellSpec:
        return self.template.replace(precision=precision, seq_len=SEQ_LEN, grad_ckpt=GRAD_CKPT, load="pretrained",
                                     warmup_steps=2, steps=5, tag="", vram_budget_bytes=None)

    def comparison(self, precisions: tuple[str, ...]) -> tuple[dict[str, dict[str, Any]], str | None]:
        """Records of the comparison cells; the second item says which did not run ok."""
        for p in precisions:
            if p not in self._cmp:
                self._cmp[p] = self.search.run_probe(self.comparison_cell(p))
        bad = [f"{self._cmp[p]['cell_id']}: {self._cmp[p]['status']}: {str(self._cmp[p].get('error') or '')[:200]}"
               for p in precisions if self._cmp[p]["status"] != "ok"]
        return {p: self._cmp[p] for p in precisions}, ("; ".join(bad) or None)

    def row(self, precision: str, grad_ckpt: str) -> CellSpec:
        return probe_cell(self.template.replace(precision=precision, grad_ckpt=grad_ckpt, tag=""), 2, BUDGET_BYTES)

    def gpu_reason(self) -> str | None:
        """Why this host cannot measure a VRAM claim (None: it can)."""
        if not self.use_gpu:
            return "needs a GPU: the claim is about VRAM, and this host runs cells on the CPU"
        if self.device_total_bytes and self.device_total_bytes < BUDGET_BYTES:
            return f"needs a GPU of at least {budget_label(BUDGET_BYTES)}; this one has " \
                   f"{self.device_total_bytes / GIB:.1f} GiB"
        return None

    def fits_at(self, row: CellSpec, seq_len: int, budget: int = BUDGET_BYTES) -> tuple[bool | None, str]:
        """Does ``row`` train ``seq_len`` tokens under ``budget``? Records first, then a probe."""
        br = self.search.bracket(row, budget)
        if br.fit is not None and br.fit.seq_len >= seq_len:
            return True, f"fits (s{br.fit.seq_len} `{br.fit.cell_id}`: {br.fit.why})"
        if br.fail is not None and br.fail.seq_len <= seq_len:
            return False, f"fails (s{br.fail.seq_len} `{br.fail.cell_id}`: {br.fail.why})"
        rec = self.search.run_probe(probe_cell(row, seq_len, budget))
        if rec["status"] == "ok":
            return True, (f"`{rec['cell_id']}` trained (NVML peak {(rec.get('peak_vram_bytes') or 0) / GIB:.2f} GiB "
                          f"of {budget / GIB:g} GiB)")
        if rec["status"] == "oom":
            return False, f"`{rec['cell_id']}` ran out of memory ({str(rec.get('error') or '').splitlines()[0][:160]})"
        return None, f"`{rec['cell_id']}`: {rec['status']}: {str(rec.get('error') or '')[:200]}"


def claim_vram_between(ctx: ClaimsContext) -> C.Verdict:
    why = ctx.gpu_reason()
    if why:
        return C.skipped("vram-between", GRAD_CKPT, why)
    recs, bad = ctx.comparison(("fp32", "bf16", "int8"))
    if bad:
        return C.Verdict("vram-between", GRAD_CKPT, C.ERROR, bad)
    v = C.judge_vram_between({p: r["peak_vram_bytes"] for p, r in recs.items()}, f"s{SEQ_LEN} gc-{GRAD_CKPT}")
    v.numbers["torch_peak_allocated_bytes"] = {p: r.get("torch_peak_allocated_bytes") for p, r in recs.items()}
    v.numbers["cells"] = [r["cell_id"] for r in recs.values()]
    return v


def claim_faster(ctx: ClaimsContext) -> C.Verdict:
    recs, bad = ctx.comparison(("bf16", "int8", "nf4"))
    if bad:
        return C.Verdict("faster", GRAD_CKPT, C.ERROR, bad)
    where = "GPU" if ctx.use_gpu else "CPU"
    v = C.judge_faster({p: r["tokens_per_s"] for p, r in recs.items()}, f"s{SEQ_LEN} gc-{GRAD_CKPT}, {where}")
    v.numbers["cells"] = [r["cell_id"] for r in recs.values()]
    return v


def claim_more_stable(ctx: ClaimsContext) -> C.Verdict:
    recs, bad = ctx.comparison(COMPARED)
    if bad:
        return C.Verdict("more-stable", GRAD_CKPT, C.ERROR, bad)
    v = C.judge_more_stable({p: r["losses"] for p, r in recs.items()}, f"s{SEQ_LEN} gc-{GRAD_CKPT}")
    v.numbers["losses"] = {p: r["losses"] for p, r in recs.items()}
    return v


def claim_fits_2048(ctx: ClaimsContext, grad_ckpt: str) -> C.Verdict:
    why = ctx.gpu_reason()
    if why:
        return C.skipped("fits-2048-24gb", f"gc-{grad_ckpt}", why)
    fits, evidence = ctx.fits_at(ctx.row("bf16", grad_ckpt), SEQ_LEN)
    if fits is None:
        return C.Verdict("fits-2048-24gb", f"gc-{grad_ckpt}", C.ERROR, evidence)
    return C.judge_fits(fits, f"gc-{grad_ckpt}", f"bf16 s{SEQ_LEN} gc-{grad_ckpt} at 24 GiB {evidence}")


def _bf16_longest(ctx: ClaimsContext, claim: str, variant: str, grad_ckpt: str):
    """bf16's longest length at 24 GiB for a claim that builds on it, or the verdict that
    ends the claim early (skipped without a GPU, error when the search could not answer)."""
    why = ctx.gpu_reason()
    if why:
        return None, C.skipped(claim, variant, why)
    ans = ctx.search.solve(ctx.row("bf16", grad_ckpt), BUDGET_BYTES)
    if not ans.measured:
        return ans, C.Verdict(claim, variant, C.ERROR, f"longest bf16 gc-{grad_ckpt} not measured: {ans.message}")
    return ans, None


def claim_ckpt_extends(ctx: ClaimsContext, grad_ckpt: str) -> C.Verdict:
    """bf16 with ``grad_ckpt`` vs without, at 24 GiB: without fails where with fits longest."""
    variant = f"gc-{grad_ckpt} vs gc-off"
    ans, early = _bf16_longest(ctx, "ckpt-extends", variant, grad_ckpt)
    if early is not None:
        return early
    if ans.status == "oom":
        return C.judge_extends("ckpt-extends", variant, base_longest=None, base_status="oom", other_fits_beyond=True,
                               probe_len=None, evidence=f"bf16 gc-{grad_ckpt} fits no length at 24 GiB")
    fits, evidence = ctx.fits_at(ctx.row("bf16", "off"), ans.longest)
    return C.judge_extends("ckpt-extends", variant, base_longest=ans.longest, base_status=ans.status,
                           other_fits_beyond=fits, probe_len=ans.longest,
                           evidence=f"bf16 gc-{grad_ckpt} longest {ans.longest:,}; gc-off at {ans.longest:,}: {evidence}")


def claim_8bit_extends(ctx: ClaimsContext, grad_ckpt: str = GRAD_CKPT) -> C.Verdict:
    """int8 one grid step past bf16's longest at 24 GiB, same checkpointing."""
    variant = f"gc-{grad_ckpt}"
    ans, early = _bf16_longest(ctx, "8bit-extends", variant, grad_ckpt)
    if early is not None:
        return early
    grid = ctx.search.grid(ctx.row("bf16", grad_ckpt))
    probe = grid.lo if ans.status == "oom" else (ans.longest or 0) + grid.granularity
    if ans.status == "at_cap":
        return C.judge_extends("8bit-extends", variant, base_longest=ans.longest, base_status=ans.status,
                               other_fits_beyond=None, probe_len=None, evidence="bf16 already trains the cap")
    fits, evidence = ctx.fits_at(ctx.row("int8", grad_ckpt), probe)
    base = "nothing" if ans.status == "oom" else f"{ans.longest:,}"
    return C.judge_extends("8bit-extends", variant, base_longest=ans.longest, base_status=ans.status,
                           other_fits_beyond=fits, probe_len=probe,
                           evidence=f"bf16 gc-{grad_ckpt} longest {base}; int8 at {probe:,}: {evidence}")
