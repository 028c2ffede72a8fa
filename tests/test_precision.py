import pytest

from harness.core.axes import MODES
from harness.cell.precision import count_layers, resolve_flags, verify_layers
from harness.core.errors import SpecError


@pytest.mark.parametrize("kw, bf16, mode", [
    ({}, True, "bf16"),
    ({}, False, "fp16"),
    ({"load_in_4bit": False}, True, "bf16"),  # the seed's rule: no quantisation flag = 16-bit
    ({"load_in_4bit": False, "load_in_8bit": False}, False, "fp16"),
    ({"dtype": "float32"}, True, "fp32"),
    ({"dtype": "torch.float16"}, True, "fp16"),
    ({"load_in_8bit": True}, True, "int8"),
    ({"load_in_4bit": True}, True, "nf4"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, True, "fp4"),
    ({"load_in_4bit": True, "bnb_4bit_use_double_quant": True}, True, "nf4-dq"),
])
def test_flag_rules(kw, bf16, mode):
    assert resolve_flags(bf16_supported=bf16, **kw) == mode


@pytest.mark.parametrize("kw, msg", [
    ({"load_in_4bit": True, "load_in_8bit": True}, "both set"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "nf4' or 'fp4"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True}, "nf4 only"),
    ({"bnb_4bit_use_double_quant": True}, "without load_in_4bit"),
    ({"dtype": "bfloat16", "bf16_supported": False}, "does not support bf16"),
    ({"load_in_8bit": True, "dtype": "float32"}, "int8 computes"),
])
def test_flag_conflicts_are_errors(kw, msg):
    with pytest.raises(SpecError, match=msg):
        resolve_flags(**kw)


def _counts(n4=0, n8=0, plain=None, qt=None, dq=0, cd=None, unexpected=0, lora=7):
    return {"linear4bit": {"count": n4, "quant_types": qt or ({"nf4": n4} if n4 else {}), "double_quant": dq,
                           "compute_dtypes": cd or ({"bfloat16": n4} if n4 else {})},
            "linear8bit": {"count": n8}, "linear": {"count": sum((plain or {}).values()), "dtypes": plain or {}},
            "unexpected_plain": ["model.layers.0.mlp.up_proj"] * min(unexpected, 8),
            "unexpected_plain_count": unexpected, "lora_layers": lora}


def test_sixteen_bit_cell_with_any_4bit_layer_fails_loudly():
    problems = verify_layers("bf16", _counts(n4=168, plain={"bfloat16": 1}), compute_dtype="bfloat16")
    assert any("168 4-bit" in p for p in problems)
    assert verify_layers("bf16", _counts(plain={"bfloat16": 15}), compute_dtype="bfloat16") == []
    assert verify_layers("fp32", _counts(plain={"bfloat16": 15}), compute_dtype="bfloat16")


def test_quantised_proofs():
    ok4 = _counts(n4=14, plain={"bfloat16": 1})
    assert verify_layers("nf4", ok4, compute_dtype="bfloat16") == []
    assert any("double quantisation" in p for p in verify_layers("nf4-dq", ok4, compute_dtype="bfloat16"))
    assert verify_layers("nf4-dq", _counts(n4=14, dq=14), compute_dtype="bfloat16") == []
    assert any("quant types" in p for p in verify_layers("fp4", ok4, compute_dtype="bfloat16"))
    assert any("compute dtypes" in p for p in verify_layers("nf4", ok4, compute_dtype="float16"))
    assert any("not quantised" in p for p in verify_layers("nf4", _counts(n4=13, unexpected=1), compute_dtype="bfloat16"))
    assert verify_layers("int8", _counts(n8=14), compute_dtype="bfloat16") == []
    assert any("4-bit" in p for p in verify_layers("int8", _counts(n4=14), compute_dtype="bfloat16"))
    assert any("no LoRA" in p for p in verify_layers("int8", _counts(n8=14, lora=0), compute_dtype="bfloat16"))
    assert set(MODES) == {"fp32", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq"}


def test_count_layers_on_real_bitsandbytes_models(tmp_path):
    """Load the tiny model through from_pretrained with real quantisation configs and
    count what is there: the proof looks at modules, not at flags."""
    import peft
    import torch

    from harness.core.models import get_preset
    from harness.cell.build import ensure_checkpoint, load_pretrained
    from harness.cell.precision import load_kwargs

    path = ensure_checkpoint(get_preset("tiny-llama"), device="cpu", cache_dir=str(tmp_path), log=lambda *_: None)
    for prec in ("nf4-dq", "int8", "bf16"):
        model = load_pretrained(path, load_kwargs=load_kwargs(prec, bf16_supported=True), device="cpu",
                                attn_implementation="sdpa")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
        counts = count_layers(model, quantized=prec != "bf16")
        assert verify_layers(prec, counts, compute_dtype="bfloat16") == [], (prec, counts)
        assert counts["lora_layers"] == 14
        if prec == "nf4-dq":
            assert counts["linear4bit"] == {"count": 14, "quant_types": {"nf4": 14}, "double_quant": 14,
                                            "compute_dtypes": {"bfloat16": 14}}
            # the same model claimed as 16-bit is caught
            assert verify_layers("bf16", counts, compute_dtype="bfloat16")
        if prec == "int8":
            assert counts["linear8bit"]["count"] == 14 and counts["linear4bit"]["count"] == 0
        if prec == "bf16":
            assert counts["linear"]["dtypes"] == {"bfloat16": 15}
        assert counts["lora_adapter_dtypes"] == {"float32": 28}
        del model
    torch.manual_seed(0)
