"""Training stability suite: every precision trains the same LoRA on the same learnable
synthetic task from the same seed and the same base weights (one synthetic checkpoint,
``from_pretrained``) for 100 steps; each loss curve is compared with fp32's. A precision
whose loss is not finite, does not clearly fall, or ends far above fp32's fails with the
step and the values. ``stability.md`` / ``stability.json`` in the run folder hold the
table and the curves. Options: ``pytest --help``, section "lora-harness" (--stability-*)."""

import pytest

from harness.report import stability
from harness.plan.suites import reference_for


def _judge(cell, lora_harness):
    rec = lora_harness.run_suite(cell, "stability")
    lora_harness.check(rec)  # a cell that did not train is skipped / failed here, never judged
    ref = None
    if cell.precision != "fp32":
        ref = lora_harness.run_suite(reference_for(cell), "stability")
        ref = ref if ref.get("status") == "ok" else None
    return rec, stability.judge(rec, ref)


@pytest.mark.stability
def test_precision_trains_like_fp32(stability_cell, lora_harness):
    _, result = _judge(stability_cell, lora_harness)
    if result.problems:
        pytest.fail(f"{stability_cell.cell_id}: " + "; ".join(result.problems), pytrace=False)


@pytest.mark.stability
def test_fp16_overflow_is_reported(overflow_cell, lora_harness):
    """tiny-overflow's MLP activations exceed 65,504: fp32 and bf16 must train normally,
    and fp16 must be reported as an overflow with its step, never as a silent NaN."""
    rec, result = _judge(overflow_cell, lora_harness)
    if overflow_cell.precision != "fp16":
        assert not result.problems, f"{overflow_cell.cell_id}: " + "; ".join(result.problems)
        return
    assert result.nonfinite_steps, "fp16 did not overflow: the case no longer tests anything"
    message = rec.get("nonfinite_message") or ""
    assert message.startswith(f"fp16 overflow: activations became inf at step {result.nonfinite_steps[0]}"), \
        f"a non-finite fp16 loss without a clear report: {message!r}"
    assert any(message in p for p in result.problems), "the stability verdict does not carry the overflow report"
