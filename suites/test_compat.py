"""Compatibility suite: every precision x gradient checkpointing mode (x load path for
16/32-bit) trains a few real LoRA steps on this host's accelerator (or CPU). Each cell is
attempted whatever the capability rules predict, and its record holds both; a prediction
the attempt contradicts fails the test. ``compat.md`` / ``compat.json`` in the run folder
hold the table. Options: ``pytest --help``, section "lora-harness" (--compat-*)."""

import pytest


@pytest.mark.compat
def test_compat_cell(compat_cell, lora_harness):
    lora_harness.check_compat(lora_harness.run_suite(compat_cell, "compat"))


@pytest.mark.compat
def test_checkpointing_modes_differ_as_claimed(compat_group, lora_harness):
    """off / on / offload of one model x precision x load path, compared: only the
    checkpointed modes recompute, only offload moves bytes to host memory, and both keep
    fewer activation bytes on the device than off."""
    from harness.report.compat import checkpointing_problems

    rows = lora_harness.compat_group(compat_group)
    untrained = {m: r.outcome for m, r in rows.items() if r.outcome != "supported"}
    if untrained:
        pytest.skip(f"not every mode trained here ({untrained}); the cells' own tests say why")
    problems = checkpointing_problems(rows)
    if problems:
        pytest.fail(f"{compat_group}: " + "; ".join(problems), pytrace=False)


@pytest.mark.compat
def test_loading_follows_the_flags(lora_harness):
    """The seed's flag rules end to end on this host's device (the small suite model):
    load_in_4bit=False loads no quantised layer, conflicting flags are rejected, double
    quantisation and the compute dtype are what was asked, and a pre-quantised checkpoint
    or a wrapper that overrides the quantisation config is caught by the layer proof."""
    result = lora_harness.run_loading_checks()
    assert result.get("cases"), f"the loading checks did not run: {result.get('status')}: {result.get('error')}"
    failed = [f"{c['case']}: {c['detail']}" for c in result["cases"] if not c["ok"]]
    assert not failed, "; ".join(failed)
