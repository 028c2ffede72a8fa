"""Training stability suite: every precision trains the same LoRA on the same learnable
synthetic task from the same base weights (one synthetic checkpoint, ``from_pretrained``)
for 100 steps, once per seed (``--stability-seeds``: 3 with a GPU, 2 without); each
seed's loss curve is compared with fp32's of the same seed, and each precision is judged
over its seeds (``harness.report.stability``); with ``--stack`` naming other training
stacks, their cells train on the same tokens and seeds and are compared with plain hf
bf16 of the same seed:

- a loss that is not finite fails, naming the step and the values, whatever the seeds;
- a loss that does not clearly fall, or ends far above fp32's, fails only when it misses
  the limit by more than the spread over the seeds;
- a verdict inside that spread (or from one seed, which measures none) is
  **inconclusive**: the test is skipped with the margin and the noise, never passed.

Each seed's cell is a test of its own and concludes with its precision's verdict (the
other seeds' cells run, or are reused, to judge it). ``stability.md`` / ``stability.json``
in the run folder hold the verdicts with their margins, every run and the curves. Options:
``pytest --help``, section "lora-harness" (--stability-*)."""

import pytest

from harness.plan.suites import reference_for, seed_siblings
from harness.report import stability


def _run(cell, lora_harness):
    """A seed's record and its per-run judgement against fp32 of the same seed (another
    training stack's cell: against plain hf bf16 of the same seed)."""
    rec = lora_harness.run_suite(cell, "stability")
    ref = None
    if reference_for(cell) != cell:
        ref = lora_harness.run_suite(reference_for(cell), "stability")
        ref = ref if ref.get("status") == "ok" else None
    return rec, stability.judge(rec, ref)


def _verdict(cell, suite, lora_harness):
    """The precision's verdict over every seed of ``cell``'s run."""
    runs = [_run(c, lora_harness)[1] for c in seed_siblings(cell, lora_harness.suite_cells(suite))]
    return stability.judge_seeds(runs)


def _conclude(cell, verdict):
    """stable passes; inconclusive skips with the margin; anything else fails with it."""
    if verdict.verdict == stability.STABLE:
        return
    text = f"{cell.cell_id}: {verdict.verdict} over seeds {list(verdict.seeds)} on {verdict.weights}: {verdict.margin}"
    if verdict.verdict == stability.INCONCLUSIVE:
        pytest.skip(text)
    pytest.fail(text, pytrace=False)


@pytest.mark.stability
def test_precision_trains_like_fp32(stability_cell, lora_harness):
    rec, _ = _run(stability_cell, lora_harness)
    lora_harness.check(rec)  # a cell that did not train is skipped / failed here, never judged
    _conclude(stability_cell, _verdict(stability_cell, "stability", lora_harness))


@pytest.mark.stability
def test_fp16_overflow_is_reported(overflow_cell, lora_harness):
    """tiny-overflow's MLP activations exceed 65,504: fp32 and bf16 must train normally,
    and fp16 must be reported as an overflow with its step, never as a silent NaN."""
    rec, result = _run(overflow_cell, lora_harness)
    lora_harness.check(rec)
    if overflow_cell.precision != "fp16":
        _conclude(overflow_cell, _verdict(overflow_cell, "overflow", lora_harness))
        return
    assert result.nonfinite_steps, "fp16 did not overflow: the case no longer tests anything"
    message = rec.get("nonfinite_message") or ""
    assert message.startswith(f"fp16 overflow: activations became inf at step {result.nonfinite_steps[0]}"), \
        f"a non-finite fp16 loss without a clear report: {message!r}"
    assert any(message in p for p in result.problems), "the stability verdict does not carry the overflow report"
