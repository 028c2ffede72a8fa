import pytest

from harness.core.spec import CellSpec, LoraSpec, safe_name
from harness.core.errors import SpecError
from harness.core.axes import normalize_grad_ckpt, normalize_precision


def test_cell_id_is_readable_and_stable():
    c = CellSpec("llama-3.1-8b", "nf4", 2048, "on")
    assert c.cell_id == "llama-3.1-8b/nf4/s2048/gc-on"
    assert CellSpec("tiny-llama", "bf16", 64, "off", batch_size=4).cell_id == "tiny-llama/bf16/s64/gc-off/b4"
    assert CellSpec("tiny-llama", "bf16", 64, load="pretrained").cell_id.endswith("/load-pretrained")


def test_aliases_normalise():
    assert CellSpec("tiny-llama", "bfloat16", 64, "unsloth").cell_id == "tiny-llama/bf16/s64/gc-offload"
    assert normalize_precision("QLoRA") == "nf4-dq"
    assert normalize_grad_ckpt("True") == "on"


@pytest.mark.parametrize("kw, msg", [
    ({"precision": "int4"}, "unknown precision"),
    ({"grad_ckpt": "sometimes"}, "unknown gradient checkpointing"),
    ({"seq_len": 1}, "sequence length"),
    ({"batch_size": 0}, "batch size"),
    ({"steps": 0}, "measured steps"),
    ({"optimizer": "lion"}, "unknown optimizer"),
    ({"model": "a/b"}, "model name"),
])
def test_bad_specs_raise_clear_errors(kw, msg):
    base = {"model": "tiny-llama", "precision": "bf16", "seq_len": 64}
    with pytest.raises(SpecError, match=msg):
        CellSpec(**{**base, **kw})


def test_lora_validation():
    with pytest.raises(SpecError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(SpecError, match="dropout"):
        LoraSpec(dropout=1.0)


def test_dict_round_trip_and_frozen():
    c = CellSpec("tiny-qwen2", "fp4", 128, "offload", lora=LoraSpec(rank=4, target_modules="q_proj,v_proj"))
    d = c.to_dict()
    assert CellSpec.from_dict(d) == c
    with pytest.raises(Exception):
        c.seq_len = 3  # frozen
    with pytest.raises(SpecError, match="unknown cell fields"):
        CellSpec.from_dict({**d, "bogus": 1})


def test_quantized_cells_load_pretrained():
    assert CellSpec("tiny-llama", "nf4", 64).resolved_load() == "pretrained"
    assert CellSpec("tiny-llama", "bf16", 64).resolved_load() == "config"
    assert CellSpec("tiny-llama", "bf16", 64, load="pretrained").resolved_load() == "pretrained"


def test_safe_name_has_no_separators():
    assert "/" not in safe_name("llama-3.1-8b/nf4/s2048/gc-on")
