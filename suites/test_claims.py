"""The seed's claims (../shared/SEED.md), each a test per checkpointing mode (off, on,
offload: ``harness.core.axes.GRAD_CKPT_MODES``; verdicts differ by mode) that measures
what it needs and passes when the claim holds on this host, or fails with the numbers
that refute it (``harness.fit.claims`` for the criteria, ``harness.fit.claims_run`` for the
cells). Claims about VRAM are skipped on a host without a GPU, with that reason.

The comparisons (tokens/s, loss curves, peaks) run each cell once per seed
(``--claims-seeds``, default 2) and decide only when a difference is larger than the
noise measured beside it (the repeat spread over the seeds; for tokens/s also each cell's
step-time spread). An **inconclusive** verdict (inside the noise, one seed, or a search
at its cap) is neither a pass nor a failure: the test is skipped with the margin and the
noise. The run folder gets ``claims.md`` and ``claims.json``: claim, mode, verdict, the
margin it cleared and the noise, the weights, the numbers.

Cells are reused: records already in the run folder (the fit suite's, a matrix run's)
decide what they can before any new cell runs. The suite runs when asked for (this file
on the command line, or ``-m claims``); ``pytest suites/`` skips it.

    pytest suites/test_fit.py suites/test_claims.py --budgets 16,24,40,80 --run-dir reports/runs/x
"""

from pathlib import Path

import pytest

from harness.pytest_session import asked_suites

from harness.fit import claims
from harness.fit import claims_run as claimsrun
from harness.fit import search as fitrun
from harness.fit.claims import CLAIMS
from harness.cli.fit import title_for
from harness.core.errors import SpecError

MODES = claimsrun.MODES


@pytest.fixture(scope="module")
def claims_ctx(lora_harness):
    # ``pytest suites/`` (the matrix job) leaves the claims out: their cells cost minutes on
    # a GPU, and their outcomes are findings about the seed, not the health of a sweep.
    if "claims" not in asked_suites(lora_harness.pyconfig):
        pytest.skip("the claims suite runs when asked for: pytest suites/test_claims.py (or -m claims)")
    cfg, facts = lora_harness.cfg, lora_harness.facts
    gran = lora_harness.pyconfig.getoption("lh_granularity")
    gran = 256 if gran is None else gran
    max_len = lora_harness.pyconfig.getoption("lh_max_seq_len")
    prior = tuple(p for p in (lora_harness.pyconfig.getoption("lh_prior") or "").split(",") if p.strip())
    settings = fitrun.FitSettings((claimsrun.BUDGET_BYTES,), int(gran), max_len, None, prior)
    search = lora_harness.fit_search(settings)
    sweep = lora_harness.get_sweep()
    gpus = facts.get("gpus") or []
    try:
        n_seeds = claimsrun.seeds_option(lora_harness.pyconfig.getoption("lh_claims_seeds"))
    except SpecError as exc:  # a bad option ends the session as a usage error, not 18 test errors
        pytest.exit(f"lora-harness: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
    ctx = claimsrun.ClaimsContext(template=cfg.cells[0].replace(tag="", vram_budget_bytes=None), measure=search.measure,
                                  search=search, use_gpu=bool(facts.get("has_gpu")) and cfg.device != "cpu",
                                  device_total_bytes=gpus[0].get("memory_total_bytes") if gpus else None,
                                  n_seeds=n_seeds)
    ctx.run_dir = Path(sweep.store.dir)
    ctx.title = "The seed's claims, measured: " + title_for(cfg.cells).replace("Will it fit? ", "")
    yield ctx
    if ctx.verdicts:
        _write(ctx)
        lora_harness.out("")
        lora_harness.out("claims (../shared/SEED.md), measured on this host:")
        for row in claims.table_rows(ctx.verdicts):
            lora_harness.out(f"  {row[2].replace('*', ''):13s} {row[1]:10s} {row[0]}: {row[3]}")
        lora_harness.out(f"claims.md / claims.json in {ctx.run_dir}")


def _write(ctx):
    (ctx.run_dir / "claims.md").write_text(claims.markdown(ctx.verdicts, ctx.title))
    (ctx.run_dir / "claims.json").write_text(claims.to_json(ctx.verdicts))


def _conclude(ctx, v):
    """Record the verdict, then the test's outcome: holds passes; skipped and inconclusive
    skip (neither is a pass: the reason, margin and noise are the message); anything else
    fails with the numbers."""
    ctx.verdicts.append(v)
    _write(ctx)
    if v.verdict == claims.HOLDS:
        return
    what = f"{CLAIMS[v.claim].text}{' [' + v.variant + ']' if v.variant else ''}"
    if v.verdict == claims.SKIPPED:
        pytest.skip(v.summary)
    detail = f"{v.summary}; margin: {v.margin}" + (f"; measured on {v.weights}" if v.weights else "")
    if v.verdict == claims.INCONCLUSIVE:
        pytest.skip(f"INCONCLUSIVE: {what}: {detail}")
    pytest.fail(f"{v.verdict.upper()}: {what}: {detail}", pytrace=False)


@pytest.mark.claims
@pytest.mark.parametrize("grad_ckpt", MODES)
def test_16bit_vram_between_fp32_and_8bit(claims_ctx, grad_ckpt):
    _conclude(claims_ctx, claimsrun.claim_vram_between(claims_ctx, grad_ckpt))


@pytest.mark.claims
@pytest.mark.parametrize("grad_ckpt", MODES)
def test_16bit_faster_than_quantised(claims_ctx, grad_ckpt):
    _conclude(claims_ctx, claimsrun.claim_faster(claims_ctx, grad_ckpt))


@pytest.mark.claims
@pytest.mark.parametrize("grad_ckpt", MODES)
def test_16bit_more_stable(claims_ctx, grad_ckpt):
    _conclude(claims_ctx, claimsrun.claim_more_stable(claims_ctx, grad_ckpt))


@pytest.mark.claims
@pytest.mark.parametrize("grad_ckpt", MODES)
def test_16bit_fits_2048_tokens_in_24gb(claims_ctx, grad_ckpt):
    _conclude(claims_ctx, claimsrun.claim_fits_2048(claims_ctx, grad_ckpt))


@pytest.mark.claims
@pytest.mark.parametrize("grad_ckpt", MODES)
def test_checkpointing_extends_length(claims_ctx, grad_ckpt):
    _conclude(claims_ctx, claimsrun.claim_ckpt_extends(claims_ctx, grad_ckpt))


@pytest.mark.claims
@pytest.mark.parametrize("grad_ckpt", MODES)
def test_8bit_extends_length_further(claims_ctx, grad_ckpt):
    _conclude(claims_ctx, claimsrun.claim_8bit_extends(claims_ctx, grad_ckpt))
