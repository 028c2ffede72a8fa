"""Worker-side pieces on real models (CPU, in-process): where a NaN comes from, and
loading by the seed's flags with the layer proof."""

import math

import pytest

from harness.cell.loader_checks import FlagRequest, check_cases, load_by_flags
from harness.cell.precision import PrecisionProofError
from harness.core.spec import CellSpec
from harness.core.errors import SpecError
from harness.cell.train import run_cell


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt-cache"))


@pytest.fixture(scope="module")
def tiny_path(cache):
    from harness.core.models import get_preset
    from harness.cell.build import ensure_checkpoint

    return str(ensure_checkpoint(get_preset("tiny-llama"), device="cpu", cache_dir=cache, log=lambda *_: None))


def _cell(model, precision, steps=3, **kw):
    return CellSpec(model=model, precision=precision, seq_len=64, warmup_steps=0, steps=steps, load="pretrained",
                    **kw).to_dict()


def test_fp16_overflow_is_located_and_measured(cache):
    """tiny-overflow in fp16: the loss is NaN from step 0 and the record says where the
    activations left float16's range and how large they are in float32."""
    r = run_cell(_cell("tiny-overflow", "fp16"), {"cache_dir": cache})
    assert r["status"] == "ok" and r["nonfinite_losses"] == 3 and r["scaler_skipped_steps"] == 3
    d = r["nonfinite_diagnosis"]
    assert d["kind"] == "overflow" and d["step"] == 0 and d["scope"].endswith("model.layers.0.mlp")
    assert d["first_nonfinite"]["inputs_finite"] is False  # it broke between modules: act(gate) * up
    assert d["fp32_peak_abs"] > 65504
    assert r["nonfinite_message"].startswith("fp16 overflow: activations became inf at step 0 in model.layers.0.mlp")
    assert "beyond float16's 65,504" in r["nonfinite_message"]
    # the same model in fp32 is finite and the checkpointing evidence is untouched by the diagnosis
    ok = run_cell(_cell("tiny-overflow", "fp32"), {"cache_dir": cache})
    assert ok["nonfinite_losses"] == 0 and "nonfinite_diagnosis" not in ok
    assert r["grad_ckpt_evidence"]["layer_runs_forward"] == ok["grad_ckpt_evidence"]["layer_runs_forward"] == 6


def test_nan_weights_are_named_as_a_diverged_update(tiny_path):
    """A NaN that is not an overflow: a LoRA weight gone bad is found and named."""
    import torch

    from harness.cell import numerics

    got = load_by_flags(tiny_path, FlagRequest(dtype="bfloat16"))
    model = got.model
    target = next(m for n, m in model.named_modules() if n.endswith("layers.1.self_attn.v_proj.lora_B.default"))
    with torch.no_grad():
        target.weight.fill_(math.nan)
    ids = torch.randint(4, 60, (1, 32))
    d = numerics.diagnose(model, {"input_ids": ids, "labels": ids}, lambda: torch.autocast("cpu", dtype=torch.bfloat16), step=7, loss=math.nan,
                          compute_dtype="bfloat16")
    assert d["kind"] == "nan" and d["first_nonfinite"]["module"].endswith("layers.1.self_attn.v_proj.lora_B.default")
    assert d["message"].startswith("NaN at step 7: first produced in model.layers.1.self_attn.v_proj.lora_B.default")
    assert "its own weights are not finite" in d["message"]
    assert model.training  # put back as it was


def test_lora_init_comes_from_the_cell_seed(cache):
    """Stability compares precisions from the same LoRA start, so the adapter's random
    init must come from the cell's seed, not from whatever the RNG last did (LoRA B
    starts at zero, so it shows from the second step on)."""
    import torch

    a = run_cell(_cell("tiny-llama", "fp32"), {"cache_dir": cache})["losses"]
    torch.rand(12345)  # move the global RNG on, as a previous cell in the process would
    b = run_cell(_cell("tiny-llama", "fp32"), {"cache_dir": cache})["losses"]
    c = run_cell(_cell("tiny-llama", "fp32", seed=1), {"cache_dir": cache})["losses"]
    assert a == b
    assert a[2] != c[2]


def test_loading_cases_on_cpu(tiny_path, tmp_path):
    cases = {c["case"]: c for c in check_cases(tiny_path, device="cpu", bf16_supported=True, work_dir=str(tmp_path))}
    assert len(cases) == 6 and all(c["ok"] for c in cases.values()), cases
    assert "0 4-bit, 0 8-bit" in cases["load_in_4bit=False loads no quantised layer"]["detail"]
    assert "14 of 14" in cases["double quantisation is really on"]["detail"]


def test_load_by_flags_details(tiny_path):
    no_flags = load_by_flags(tiny_path, FlagRequest(load_in_4bit=False), bf16_supported=False)
    assert no_flags.mode == "fp16" and no_flags.counts["linear"]["dtypes"] == {"float16": 15}
    fp4 = load_by_flags(tiny_path, FlagRequest(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                               bnb_4bit_compute_dtype="float32"))
    assert fp4.mode == "fp4" and fp4.counts["linear4bit"]["quant_types"] == {"fp4": 14}
    assert fp4.counts["linear4bit"]["compute_dtypes"] == {"float32": 14}
    int8 = load_by_flags(tiny_path, FlagRequest(load_in_8bit=True))
    assert int8.counts["linear8bit"]["count"] == 14 and int8.counts["linear4bit"]["count"] == 0
    with pytest.raises(SpecError, match="both set"):
        load_by_flags(tiny_path, FlagRequest(load_in_4bit=True, load_in_8bit=True))
    with pytest.raises(SpecError, match="without load_in_4bit"):
        load_by_flags(tiny_path, FlagRequest(bnb_4bit_use_double_quant=True))

    def ignores_flags(path, *, device, **kwargs):  # a loader that drops the caller's quantisation
        from harness.cell.build import load_pretrained

        return load_pretrained(path, load_kwargs={"dtype": kwargs["dtype"]}, device=device, attn_implementation="sdpa")

    with pytest.raises(PrecisionProofError, match="no 8-bit .Linear8bitLt. layers loaded in an int8 cell"):
        load_by_flags(tiny_path, FlagRequest(load_in_8bit=True), loader=ignores_flags)
