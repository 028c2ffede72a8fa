"""The training-stack axis, planned on a CPU host: ids, options, capability rules."""

import pytest

from harness.core.errors import SpecError
from harness.core.spec import CellSpec
from harness.plan import capability
from harness.plan.options import build_config

CPU = {"has_gpu": False}
GPU_FACTS = {"has_gpu": True, "use_gpu": True, "gpus": [{"name": "NVIDIA H200", "compute_capability": "9.0"}],
             "compute_capability": "9.0", "torch_cuda_version": "13.0", "driver_cuda_version": "13.0",
             "bitsandbytes_installed": True,
             "packages": {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2",
                          "accelerate": "1.15.0", "liger-kernel": "0.8.5", "unsloth": "2026.10.9",
                          "unsloth_zoo": "2026.10.9"}}


def test_default_stack_leaves_every_existing_id_unchanged():
    base = CellSpec("llama-3.1-8b", "bf16", 2048, grad_ckpt="on")
    assert base.cell_id == "llama-3.1-8b/bf16/s2048/gc-on"
    assert base.replace(stack="liger").cell_id == "llama-3.1-8b/bf16/s2048/gc-on/stack-liger"
    assert base.replace(compile=True, attn_implementation="eager").cell_id == \
        "llama-3.1-8b/bf16/s2048/gc-on/compile/attn-eager"
    with pytest.raises(SpecError, match="unknown training stack"):
        CellSpec("tiny-llama", "bf16", 64, stack="deepspeed")
    with pytest.raises(SpecError, match="unknown attention implementation"):
        CellSpec("tiny-llama", "bf16", 64, attn_implementation="magic")


def test_the_options_cross_stacks_and_attention_kernels_as_axes():
    cfg = build_config({"stack": "hf,liger,unsloth", "attn": "sdpa,eager", "compile": True, "precision": "bf16",
                        "seq_len": "64", "grad_ckpt": "on"}, CPU)
    assert [c.cell_id for c in cfg.cells] == [
        "tiny-llama/bf16/s64/gc-on/compile", "tiny-llama/bf16/s64/gc-on/compile/attn-eager",
        "tiny-llama/bf16/s64/gc-on/stack-liger/compile", "tiny-llama/bf16/s64/gc-on/stack-liger/compile/attn-eager",
        "tiny-llama/bf16/s64/gc-on/stack-unsloth/compile",
        "tiny-llama/bf16/s64/gc-on/stack-unsloth/compile/attn-eager"]


@pytest.mark.parametrize("stack", ["liger", "unsloth"])
def test_gpu_stacks_are_unsupported_on_a_cpu_host_with_the_reason(stack):
    cell = CellSpec("tiny-llama", "bf16", 1024, stack=stack)
    v = capability.verdict(cell, dict(CPU, use_gpu=False, packages={}))
    assert not v.supported and v.rule == "stack-gpu" and "run on a CUDA GPU only" in v.reason


def test_unsloth_rules_on_a_gpu_host():
    def reason(**kw):
        return capability.verdict(CellSpec("llama-3.1-8b", **kw), GPU_FACTS).reason

    assert reason(precision="bf16", seq_len=2048, stack="unsloth", grad_ckpt="on") is None
    assert reason(precision="nf4-dq", seq_len=2048, stack="unsloth", grad_ckpt="offload") is None
    assert "nf4-dq" in reason(precision="nf4", seq_len=2048, stack="unsloth")
    assert "not fp32" in reason(precision="fp32", seq_len=2048, stack="unsloth")
    assert "below 512 tokens" in reason(precision="bf16", seq_len=256, stack="unsloth", grad_ckpt="offload")
    missing = dict(GPU_FACTS, packages=dict(GPU_FACTS["packages"], unsloth=None))
    assert "not installed" in capability.verdict(CellSpec("llama-3.1-8b", "bf16", 2048, stack="unsloth"),
                                                 missing).reason
    too_new = dict(GPU_FACTS, stack_requirements={"unsloth": ["transformers<=5.17.0 (installed 5.25.0)"]})
    assert "transformers<=5.17.0" in capability.verdict(CellSpec("llama-3.1-8b", "bf16", 2048, stack="unsloth"),
                                                        too_new).reason


def test_unmet_requirements_are_read_from_installed_metadata():
    from harness.core.host import unmet_requirements

    assert unmet_requirements("peft") == []  # the installed peft accepts the installed torch
    assert unmet_requirements("no-such-distribution") == []
