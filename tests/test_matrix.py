import pytest

from harness.plan.matrix import PRESETS, axes_for, expand, parse_ints, split_list
from harness.core.axes import GRAD_CKPT_MODES, PRECISIONS
from harness.core.errors import SpecError


def test_preset_sizes():
    smoke = expand(axes_for("smoke", models=["tiny-llama"]))
    assert len(smoke) == len(PRECISIONS) * 2 * len(GRAD_CKPT_MODES)
    default = expand(axes_for("default", models=["llama-3.1-8b"]))
    assert len(default) == 4 * 3 * 3
    assert {c.precision for c in default} == {"fp32", "bf16", "int8", "nf4"}
    assert {c.seq_len for c in default} == {512, 2048, 8192}
    full = expand(axes_for("full", models=["llama-3.1-8b"]))
    assert sorted({c.seq_len for c in full}) == [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert len(full) == len(PRECISIONS) * 8 * 3


def test_axes_override_preset_and_order():
    cells = expand(axes_for("default", models=["tiny-llama"], precision="nf4,bf16", seq_len="2048,512",
                            grad_ckpt="unsloth,off"))
    ids = [c.cell_id for c in cells]
    # precision order follows the canonical list, lengths ascend inside a row
    assert ids == [
        "tiny-llama/bf16/s512/gc-off", "tiny-llama/bf16/s2048/gc-off",
        "tiny-llama/bf16/s512/gc-offload", "tiny-llama/bf16/s2048/gc-offload",
        "tiny-llama/nf4/s512/gc-off", "tiny-llama/nf4/s2048/gc-off",
        "tiny-llama/nf4/s512/gc-offload", "tiny-llama/nf4/s2048/gc-offload",
    ]


def test_several_step_counts_get_distinct_ids():
    cells = expand(axes_for("smoke", models=["tiny-llama"], precision="bf16", seq_len="64", grad_ckpt="off",
                            steps="3,6"))
    assert [c.cell_id for c in cells] == ["tiny-llama/bf16/s64/gc-off/n3", "tiny-llama/bf16/s64/gc-off/n6"]
    single = expand(axes_for("smoke", models=["tiny-llama"], precision="bf16", seq_len="64", grad_ckpt="off",
                             steps="7"))
    assert single[0].steps == 7 and single[0].cell_id == "tiny-llama/bf16/s64/gc-off"


def test_list_parsing():
    assert split_list(" a, b ,,c") == ["a", "b", "c"]
    assert split_list(["a,b", "c"]) == ["a", "b", "c"]
    assert parse_ints("512,2k", "--seq-len") == [512, 2000]
    with pytest.raises(SpecError, match="not a whole number"):
        parse_ints("12x", "--seq-len")
    with pytest.raises(SpecError, match="below the minimum"):
        parse_ints("0", "--batch-size")


def test_unknown_preset_and_precision():
    with pytest.raises(SpecError, match="unknown matrix preset"):
        axes_for("huge", models=["tiny-llama"])
    with pytest.raises(SpecError, match="unknown precision"):
        axes_for("smoke", models=["tiny-llama"], precision="int3")
    assert set(PRESETS) == {"smoke", "default", "full"}
