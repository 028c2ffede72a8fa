"""Capability rules: fake host facts in, verdicts out (no GPU needed)."""

import pytest

from harness.plan import capability
from harness.plan.capability import parse_version, verdict
from harness.core.axes import PRECISIONS
from harness.core.spec import CellSpec

PKGS = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2",
        "accelerate": "1.15.0"}


def host(**kw):
    """An H200 host like the test host; keyword arguments change one fact."""
    facts = {"has_gpu": True, "use_gpu": True, "device_pref": "auto", "gpu_name": "NVIDIA H200",
             "compute_capability": "9.0", "bitsandbytes_installed": True, "packages": dict(PKGS),
             "torch_cuda_version": "13.0", "driver_cuda_version": "13.0", "flash_attn_installed": False}
    pk = kw.pop("packages", {})
    facts.update(kw)
    facts["packages"].update(pk)
    return facts


def cell(precision="bf16", **kw):
    return CellSpec("m", precision, 64, **kw)


def supported(precision, facts, **kw):
    return verdict(cell(precision, **kw), facts).supported


def test_h200_supports_everything():
    for p in PRECISIONS:
        assert verdict(cell(p), host()) == capability.Prediction(True), p


def test_cpu_host_with_current_libraries_supports_everything():
    cpu = host(has_gpu=False, use_gpu=False, gpu_name=None, compute_capability=None, torch_cuda_version=None,
               driver_cuda_version=None, packages={"torch": "2.13.0+cpu"})
    assert all(supported(p, cpu) for p in PRECISIONS)


def test_t4_has_no_bf16_but_has_int8_and_4bit():
    t4 = host(gpu_name="Tesla T4", compute_capability="7.5", torch_cuda_version="12.8", driver_cuda_version="12.8")
    v = verdict(cell("bf16"), t4)
    assert not v.supported and v.rule == "bf16-cc80" and "Tesla T4 is 7.5" in v.reason
    assert all(supported(p, t4) for p in ("fp32", "fp16", "int8", "nf4", "fp4", "nf4-dq"))


def test_v100_with_a_cuda13_build_runs_nothing_and_cuda12_runs_most():
    v100 = host(gpu_name="Tesla V100", compute_capability="7.0")
    for p in PRECISIONS:
        v = verdict(cell(p), v100)
        assert not v.supported and "cuda13-arch" in dict(v.fired), p
    cu12 = host(gpu_name="Tesla V100", compute_capability="7.0", torch_cuda_version="12.6", driver_cuda_version="12.6")
    assert supported("fp16", cu12) and supported("nf4", cu12)
    assert verdict(cell("int8"), cu12).rule == "bnb-cc"  # LLM.int8() needs 7.5
    assert verdict(cell("bf16"), cu12).rule == "bf16-cc80"


def test_driver_older_than_the_torch_build():
    old_driver = host(driver_cuda_version="12.4")
    v = verdict(cell("fp32"), old_driver)
    assert v.rule == "cuda-driver" and "built for CUDA 13.0" in v.reason and "CUDA 12.4" in v.reason
    # minor version compatibility: a 12.8 build runs on a 12.4 driver
    assert supported("fp32", host(torch_cuda_version="12.8", driver_cuda_version="12.4"))


def test_pascal_has_4bit_but_no_int8():
    p100 = host(gpu_name="Tesla P100", compute_capability="6.0", torch_cuda_version="12.6", driver_cuda_version="12.6")
    assert supported("nf4", p100) and not supported("int8", p100)
    k80 = host(gpu_name="Tesla K80", compute_capability="3.7", torch_cuda_version="11.8", driver_cuda_version="11.8")
    assert verdict(cell("nf4"), k80).rule == "bnb-cc"
    assert verdict(cell("fp32", optimizer="adamw8bit"), k80).rule == "bnb-cc"


def test_library_version_floors():
    assert verdict(cell("nf4"), host(packages={"bitsandbytes": "0.45.0"})).rule == "bnb-transformers"
    assert supported("bf16", host(packages={"bitsandbytes": "0.45.0"}))  # 16-bit needs no bitsandbytes
    assert verdict(cell("nf4"), host(packages={"accelerate": "0.30.1"})).rule == "accelerate"
    assert verdict(cell("nf4"), host(packages={"accelerate": None})).rule == "accelerate"
    assert verdict(cell("fp32"), host(packages={"torch": "2.5.1+cu124"})).rule == "transformers-torch"
    v = verdict(cell("nf4"), host(packages={"torch": "2.3.1", "transformers": "4.57.0"}))
    assert v.rule == "bnb-torch" and "torch >= 2.4" in v.reason
    cpu_old_bnb = host(has_gpu=False, use_gpu=False, packages={"bitsandbytes": "0.47.0"})
    assert verdict(cell("int8"), cpu_old_bnb).rule == "bnb-cpu"
    assert verdict(cell("int8"), host(packages={"bitsandbytes": "0.47.0"})).supported  # fine on a GPU


def test_missing_bitsandbytes_and_devices():
    v = verdict(cell("int8"), host(bitsandbytes_installed=False, packages={"bitsandbytes": None}))
    assert v.rule == "bnb-installed"
    no_gpu = host(has_gpu=False, use_gpu=False, device_pref="cuda")
    assert verdict(cell("fp32"), no_gpu).rule == "gpu-present"
    cpu_torch = host(device_pref="cuda", torch_cuda_version=None)
    assert verdict(cell("fp32"), cpu_torch).rule == "torch-cuda-build"


def test_flash_attention_rule():
    fa = dict(attn_implementation="flash_attention_2")
    assert verdict(cell("bf16", **fa), host()).rule == "flash-attn2"  # package missing
    assert verdict(cell("bf16", **fa), host(flash_attn_installed=True)).supported
    t4 = host(flash_attn_installed=True, compute_capability="7.5", gpu_name="Tesla T4")
    assert verdict(cell("fp16", **fa), t4).rule == "flash-attn2"


def test_unknown_facts_predict_nothing():
    """A rule only fires on facts the host reported: no versions, no prediction."""
    bare = {"has_gpu": True, "use_gpu": True, "bitsandbytes_installed": True}
    assert all(supported(p, bare) for p in PRECISIONS)


def test_every_rule_fired_is_listed_and_rules_are_documented():
    v = verdict(cell("int8"), host(compute_capability="7.0", gpu_name="V100", driver_cuda_version="12.2"))
    assert [name for name, _ in v.fired] == ["cuda-driver", "cuda13-arch", "bnb-cc"]
    assert v.to_dict()["fired"][0][0] == "cuda-driver"
    table = capability.rules_table()
    assert len(table) == len(capability.RULES) and all(r["what"] for r in table)
    assert len({r["rule"] for r in table}) == len(table)


@pytest.mark.parametrize("text, parsed", [("2.11.0+cu130", (2, 11, 0)), ("0.50.2", (0, 50, 2)), ("13.0", (13, 0)),
                                          ("5.0.0rc1", (5, 0, 0)), (None, None), ("dev", None)])
def test_parse_version(text, parsed):
    assert parse_version(text) == parsed
