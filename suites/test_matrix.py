"""The matrix: one real LoRA training cell per test (precision x sequence length x
gradient checkpointing x batch size, for each model). Options: ``pytest --help``,
section "lora-harness"."""

import pytest


@pytest.mark.matrix
def test_lora_cell(lora_cell, lora_harness, lora_benchmark):
    record = lora_harness.run(lora_cell, lora_benchmark)
    lora_harness.check(record)
