"""Measuring the seed's claims: which cells each claim needs, in every checkpointing mode,
reusing the fit search's cells and every record of the run folder. Parent side (no
torch); the verdict rules are in ``harness.fit.claims``.

The cells:
- comparisons (vram-between, faster, more-stable): fp32 / bf16 / int8 / nf4 at 2048
  tokens (128 on a CPU host: the claims there are about speed and numerics, and 2048
  tokens of bf16 take seconds a step on a CPU), one set per checkpointing mode and per
  seed, all loaded through ``from_pretrained`` from the same synthetic checkpoint
  (``load=pretrained``; its weights do not depend on the cell's seed) so every precision
  and seed starts from the same base weights, with the default steps (2 warm-up + 5
  measured). The first seed's cells have the matrix's ids, so a matrix run's records are
  reused; the others end in ``/seed<k>`` (``harness.core.evidence``). Seeds: the session's
  ``--seed`` and the next ``--claims-seeds`` - 1 integers; one seed measures no noise,
  so every comparison is then inconclusive;
- budget claims (24 GiB): answers and probes of :class:`harness.fit.search.FitSearch`,
  whose records (from ``suites/test_fit.py`` or ``lora-harness fit`` in the same run
  folder) decide as much as they can before any new cell runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from harness.core import evidence as E
from harness.core.axes import GRAD_CKPT_MODES
from harness.core.budget import GIB, budget_label
from harness.core.errors import SpecError
from harness.core.spec import CellSpec
from harness.fit import claims as C
from harness.fit.search import FitSearch, probe_cell

SEQ_LEN = 2048
CPU_SEQ_LEN = 128
BUDGET_BYTES = 24 * GIB
COMPARED = ("fp32", "bf16", "int8", "nf4")
MODES = GRAD_CKPT_MODES
DEFAULT_SEEDS = 2


def seeds_option(n: int | None) -> int:
    """--claims-seeds: how many seeds the comparisons run (default 2)."""
    n = DEFAULT_SEEDS if n is None else int(n)
    if n < 1:
        raise SpecError(f"--claims-seeds must be >= 1, got {n}")
    return n


@dataclass
class ClaimsContext:
    template: CellSpec  # model, LoRA, optimizer, seed of the session
    measure: Callable[[CellSpec], dict[str, Any]]
    search: FitSearch
    use_gpu: bool
    device_total_bytes: int | None = None
    n_seeds: int = DEFAULT_SEEDS
    seq_len: int | None = None  # the comparisons' length; None: SEQ_LEN on a GPU, CPU_SEQ_LEN on a CPU
    verdicts: list[C.Verdict] = field(default_factory=list)
    _cmp: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)

    # -- cells -----------------------------------------------------------------------
    @property
    def comparison_len(self) -> int:
        return self.seq_len or (SEQ_LEN if self.use_gpu else CPU_SEQ_LEN)

    @property
    def seeds(self) -> tuple[int, ...]:
        return E.seeds(self.template.seed, self.n_seeds)

    def comparison_cell(self, precision: str, grad_ckpt: str, seed: int | None = None) -> CellSpec:
        seed = self.template.seed if seed is None else seed
        return self.template.replace(precision=precision, seq_len=self.comparison_len, grad_ckpt=grad_ckpt,
                                     load="pretrained", warmup_steps=2, steps=5, seed=seed,
                                     tag=E.seed_tag("", seed, self.template.seed), vram_budget_bytes=None)

    def comparison(self, precisions: tuple[str, ...], grad_ckpt: str) -> tuple[dict[str, list[dict[str, Any]]],
                                                                                str | None]:
        """Records of the comparison cells, one per seed and precision; the second item
        says which did not run ok."""
        out: dict[str, list[dict[str, Any]]] = {}
        for p in precisions:
            for s in self.seeds:
                if (p, grad_ckpt, s) not in self._cmp:
                    self._cmp[(p, grad_ckpt, s)] = self.search.run_probe(self.comparison_cell(p, grad_ckpt, s))
            out[p] = [self._cmp[(p, grad_ckpt, s)] for s in self.seeds]
        bad = [f"{r['cell_id']}: {r['status']}: {str(r.get('error') or '')[:200]}"
               for rs in out.values() for r in rs if r["status"] != "ok"]
        return out, ("; ".join(bad) or None)

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

    def fits_at(self, row: CellSpec, seq_len: int, budget: int = BUDGET_BYTES) -> tuple[bool | None, str, str]:
        """Does ``row`` train ``seq_len`` tokens under ``budget``? Records first, then a probe.
        Returns (fits, the evidence, the margin it was decided by)."""
        br = self.search.bracket(row, budget)
        b = budget_label(budget)
        if br.fit is not None and br.fit.seq_len >= seq_len:
            return True, f"fits (s{br.fit.seq_len} `{br.fit.cell_id}`: {br.fit.why})", \
                f"a cell of {br.fit.seq_len:,} tokens (>= {seq_len:,}) trained under {b}"
        if br.fail is not None and br.fail.seq_len <= seq_len:
            return False, f"fails (s{br.fail.seq_len} `{br.fail.cell_id}`: {br.fail.why})", \
                f"a cell of {br.fail.seq_len:,} tokens (<= {seq_len:,}) ran out of memory under {b}"
        rec = self.search.run_probe(probe_cell(row, seq_len, budget))
        if rec["status"] == "ok":
            peak = rec.get("peak_vram_bytes") or 0
            return True, (f"`{rec['cell_id']}` trained (NVML peak {peak / GIB:.2f} GiB of {budget / GIB:g} GiB)"), \
                f"NVML peak {peak / GIB:.2f} GiB of {b}: {(budget - peak) / GIB:.2f} GiB headroom"
        if rec["status"] == "oom":
            first = (str(rec.get("error") or "").splitlines() or [""])[0][:160]
            return False, f"`{rec['cell_id']}` ran out of memory ({first})", f"ran out of memory under {b}"
        return None, f"`{rec['cell_id']}`: {rec['status']}: {str(rec.get('error') or '')[:200]}", ""


def _variant(ctx: ClaimsContext, grad_ckpt: str, extra: str = "") -> str:
    return f"s{ctx.comparison_len} gc-{grad_ckpt}{extra}"


def claim_vram_between(ctx: ClaimsContext, grad_ckpt: str) -> C.Verdict:
    why = ctx.gpu_reason()
    if why:
        return C.skipped("vram-between", f"gc-{grad_ckpt}", why, grad_ckpt)
    recs, bad = ctx.comparison(("fp32", "bf16", "int8"), grad_ckpt)
    if bad:
        return C.Verdict("vram-between", f"gc-{grad_ckpt}", C.ERROR, bad, grad_ckpt=grad_ckpt)
    v = C.judge_vram_between({p: [r["peak_vram_bytes"] for r in rs] for p, rs in recs.items()},
                             _variant(ctx, grad_ckpt), grad_ckpt)
    v.numbers["torch_peak_allocated_bytes"] = {p: [r.get("torch_peak_allocated_bytes") for r in rs]
                                               for p, rs in recs.items()}
    v.numbers["cells"] = [r["cell_id"] for rs in recs.values() for r in rs]
    return v


def claim_faster(ctx: ClaimsContext, grad_ckpt: str) -> C.Verdict:
    recs, bad = ctx.comparison(("bf16", "int8", "nf4"), grad_ckpt)
    if bad:
        return C.Verdict("faster", f"gc-{grad_ckpt}", C.ERROR, bad, grad_ckpt=grad_ckpt)
    where = "GPU" if ctx.use_gpu else "CPU"
    v = C.judge_faster({p: [r["tokens_per_s"] for r in rs] for p, rs in recs.items()},
                       _variant(ctx, grad_ckpt, f", {where}"), grad_ckpt,
                       step_spread={p: [E.step_time_spread(r.get("step_times_s")) for r in rs]
                                    for p, rs in recs.items()})
    v.numbers["cells"] = [r["cell_id"] for rs in recs.values() for r in rs]
    return v


def claim_more_stable(ctx: ClaimsContext, grad_ckpt: str) -> C.Verdict:
    recs, bad = ctx.comparison(COMPARED, grad_ckpt)
    if bad:
        return C.Verdict("more-stable", f"gc-{grad_ckpt}", C.ERROR, bad, grad_ckpt=grad_ckpt)
    weights = E.weights_label(recs["fp32"][0].get("spec"))
    v = C.judge_more_stable({p: [r["losses"] for r in rs] for p, rs in recs.items()}, _variant(ctx, grad_ckpt),
                            grad_ckpt, weights=weights)
    v.numbers["losses"] = {p: [r["losses"] for r in rs] for p, rs in recs.items()}
    v.numbers["cells"] = [r["cell_id"] for rs in recs.values() for r in rs]
    return v


def claim_fits_2048(ctx: ClaimsContext, grad_ckpt: str) -> C.Verdict:
    why = ctx.gpu_reason()
    if why:
        return C.skipped("fits-2048-24gb", f"gc-{grad_ckpt}", why, grad_ckpt)
    fits, evidence, margin = ctx.fits_at(ctx.row("bf16", grad_ckpt), SEQ_LEN)
    if fits is None:
        return C.Verdict("fits-2048-24gb", f"gc-{grad_ckpt}", C.ERROR, evidence, grad_ckpt=grad_ckpt)
    return C.judge_fits(fits, f"gc-{grad_ckpt}", f"bf16 s{SEQ_LEN} gc-{grad_ckpt} at 24 GiB {evidence}", grad_ckpt,
                        margin)


def _bf16_longest(ctx: ClaimsContext, claim: str, variant: str, grad_ckpt: str):
    """bf16's longest length at 24 GiB for a claim that builds on it, or the verdict that
    ends the claim early (skipped without a GPU, error when the search could not answer)."""
    why = ctx.gpu_reason()
    if why:
        return None, C.skipped(claim, variant, why, grad_ckpt)
    ans = ctx.search.solve(ctx.row("bf16", grad_ckpt), BUDGET_BYTES)
    if not ans.measured:
        return ans, C.Verdict(claim, variant, C.ERROR, f"longest bf16 gc-{grad_ckpt} not measured: {ans.message}",
                              grad_ckpt=grad_ckpt)
    return ans, None


def claim_ckpt_extends(ctx: ClaimsContext, grad_ckpt: str) -> C.Verdict:
    """bf16 with ``grad_ckpt`` vs without, at 24 GiB: without fails where with fits longest."""
    variant = f"gc-{grad_ckpt} vs gc-off"
    if grad_ckpt == "off":
        return C.skipped("ckpt-extends", variant, "nothing to judge: gc-off is the mode checkpointing is compared "
                                                  "with", grad_ckpt)
    ans, early = _bf16_longest(ctx, "ckpt-extends", variant, grad_ckpt)
    if early is not None:
        return early
    kw = dict(grad_ckpt=grad_ckpt)
    if ans.status == "oom":
        return C.judge_extends("ckpt-extends", variant, base_longest=None, base_status="oom", other_fits_beyond=True,
                               probe_len=None, evidence=f"bf16 gc-{grad_ckpt} fits no length at 24 GiB",
                               margin="no length trains with checkpointing", **kw)
    fits, evidence, margin = ctx.fits_at(ctx.row("bf16", "off"), ans.longest)
    gran = ctx.search.grid(ctx.row("bf16", grad_ckpt)).granularity
    return C.judge_extends("ckpt-extends", variant, base_longest=ans.longest, base_status=ans.status,
                           other_fits_beyond=fits, probe_len=ans.longest,
                           evidence=f"bf16 gc-{grad_ckpt} longest {ans.longest:,}; gc-off at {ans.longest:,}: "
                                    f"{evidence}",
                           margin=f"gc-off at {ans.longest:,} tokens: {margin} (lengths known to the search's "
                                  f"{gran}-token step)", **kw)


def claim_8bit_extends(ctx: ClaimsContext, grad_ckpt: str) -> C.Verdict:
    """int8 one grid step past bf16's longest at 24 GiB, same checkpointing."""
    variant = f"gc-{grad_ckpt}"
    ans, early = _bf16_longest(ctx, "8bit-extends", variant, grad_ckpt)
    if early is not None:
        return early
    grid = ctx.search.grid(ctx.row("bf16", grad_ckpt))
    probe = grid.lo if ans.status == "oom" else (ans.longest or 0) + grid.granularity
    kw = dict(grad_ckpt=grad_ckpt)
    if ans.status == "at_cap":
        return C.judge_extends("8bit-extends", variant, base_longest=ans.longest, base_status=ans.status,
                               other_fits_beyond=None, probe_len=None, evidence="bf16 already trains the cap",
                               margin="bf16 trains the search's cap", **kw)
    fits, evidence, margin = ctx.fits_at(ctx.row("int8", grad_ckpt), probe)
    base = "nothing" if ans.status == "oom" else f"{ans.longest:,}"
    return C.judge_extends("8bit-extends", variant, base_longest=ans.longest, base_status=ans.status,
                           other_fits_beyond=fits, probe_len=probe,
                           evidence=f"bf16 gc-{grad_ckpt} longest {base}; int8 at {probe:,}: {evidence}",
                           margin=f"int8 at {probe:,} tokens, one {grid.granularity}-token step past bf16's longest "
                                  f"({base}): {margin}", **kw)


# The claims in the order the suite runs them, each judged in every mode.
CLAIM_FUNCTIONS: dict[str, Callable[[ClaimsContext, str], C.Verdict]] = {
    "vram-between": claim_vram_between, "faster": claim_faster, "more-stable": claim_more_stable,
    "fits-2048-24gb": claim_fits_2048, "ckpt-extends": claim_ckpt_extends, "8bit-extends": claim_8bit_extends}


def judge_all(ctx: ClaimsContext) -> list[C.Verdict]:
    """Every claim in every checkpointing mode (what ``lora-harness`` or a script asks for)."""
    return [CLAIM_FUNCTIONS[k](ctx, m) for k in CLAIM_FUNCTIONS for m in MODES]
