"""The training-stack axis in the cell, on a CPU host: --attn and --compile run as real
cells (forked workers, through the Sweep); the Liger and Unsloth cells cannot run here
(their kernels need a CUDA GPU), so their proofs are checked against models they did not
patch, and their import failures against a stand-in."""

import os
import sys

import pytest

from harness.cell import attention
from harness.cell.stacks import base, liger, unsloth
from harness.cell.train import run_cell
from harness.core import host as env_mod
from harness.core import schema
from harness.core.errors import SpecError
from harness.core.spec import CellSpec
from harness.plan import capability
from harness.plan.options import build_config
from harness.run.sweep import Sweep


def _tiny(**kw):
    base_kw = dict(model="tiny-llama", precision="fp32", seq_len=32, grad_ckpt="on", warmup_steps=2, steps=2)
    base_kw.update(kw)
    return CellSpec(**base_kw)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return {"cache_dir": str(tmp_path_factory.mktemp("stack-cache")), "device": "cpu"}


@pytest.mark.slow
def test_attn_eager_and_compile_run_as_real_cells(tmp_path):
    """One sweep, two cells: eager attention, and the same compiled (inductor on the CPU:
    20-60 s on a 2-core host with a cold compile cache)."""
    cfg = build_config({"model": "tiny-llama", "precision": "fp32", "seq_len": "32", "grad_ckpt": "on",
                        "steps": "2", "warmup_steps": 2, "attn": "eager", "device": "cpu",
                        "run_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}, env_mod.quick_facts())
    eager = cfg.cells[0]
    compiled = eager.replace(compile=True)
    with Sweep(cfg, env_mod.quick_facts(), out=lambda s: None) as sw:
        recs = {"eager": sw.run(eager), "compiled": sw.run(compiled)}
    for name, rec in recs.items():
        assert rec["status"] == "ok", (name, rec["error"])
        assert rec["attn_implementation_used"] == rec["attn_implementation_after_load"] == "eager"
        assert rec["stack"] == "hf" and rec["stack_versions"]["peft"] and rec["pytorch_alloc_conf"]
        assert schema.undeclared(rec) == [], name
    rec = recs["compiled"]
    counters = rec["compile_counters"]
    assert rec["cell_id"].endswith("/gc-on/compile/attn-eager")
    assert counters["frames_ok"] >= 1 and counters["unique_graphs"] >= 1 and counters["recompiles_measured"] == 0
    # the compile is paid by the second warm-up step, never by a measured step
    assert rec["compile_first_step_s"] == rec["warmup_step_times_s"][1] > max(rec["step_times_s"])
    assert 0 < rec["compile_s"] < rec["compile_first_step_s"]
    # compiled steps carry no counting hooks: the checkpointing proof is the first (eager) step's
    ev = rec["grad_ckpt_evidence"]
    assert ev["proof"] == "first step" and ev["steps_observed"] == 1 and ev["layer_recomputes"] == 2
    # the same maths: compiled losses follow the eager cell's
    assert rec["losses"] == pytest.approx(recs["eager"]["losses"], rel=1e-4)


def test_an_attention_kernel_other_than_the_one_asked_is_an_error(cache, monkeypatch):
    monkeypatch.setattr(attention, "used", lambda model: "sdpa")
    r = run_cell(_tiny(attn_implementation="eager", steps=1).to_dict(), cache)
    assert r["status"] == "error" and r["error"].startswith("attention proof failed: the layers use sdpa, not eager")


def test_a_compiled_cell_that_compiled_nothing_is_an_error(cache, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "compile", lambda module, backend=None: module)  # runs eagerly
    r = run_cell(_tiny(compile=True, steps=1).to_dict(), cache)
    assert r["status"] == "error" and "compile proof failed: torch._dynamo compiled no frame" in r["error"]
    assert r["compile_counters"]["frames_ok"] == 0


@pytest.mark.parametrize("stack", ["liger", "unsloth"])
def test_gpu_stacks_are_unsupported_in_a_cpu_cell(cache, stack):
    r = run_cell(_tiny(stack=stack, precision="bf16", seq_len=512).to_dict(), cache)
    assert r["status"] == "unsupported" and "run on a CUDA GPU only" in r["error"]


def test_a_stack_that_cannot_be_imported_is_unsupported_with_the_reason(cache, monkeypatch):
    """A GPU host where ``import unsloth`` fails (a missing dependency, a version it refuses):
    the cell says why, and nothing but the cell's own process is touched."""
    monkeypatch.setattr(base, "_cuda_here", lambda opts: True)
    monkeypatch.setitem(sys.modules, "unsloth", None)  # import unsloth -> ImportError
    r = run_cell(_tiny(stack="unsloth", precision="bf16", seq_len=512).to_dict(), cache)
    assert r["status"] == "unsupported"
    assert r["error"].startswith("unsloth cannot be imported here: ModuleNotFoundError: import of unsloth halted")


def test_the_layer_census_judges_whatever_a_stack_loaded(cache, monkeypatch):
    """The seed's question for every stack: 16-bit asked, 4-bit loaded (here by a stand-in
    stack that quietly loads nf4) fails the precision proof."""
    from harness.cell import stacks
    from harness.cell.precision import load_kwargs
    from harness.cell.stacks import hf

    class Quiet4bit:
        wrap, prove, check_step = staticmethod(hf.wrap), staticmethod(hf.prove), staticmethod(hf.check_step)

        @staticmethod
        def load(b):
            b.load_kwargs = load_kwargs("nf4", bf16_supported=True, skip_modules=b.skips)
            return hf.load(b)

    monkeypatch.setattr(stacks, "get", lambda name: Quiet4bit)
    r = run_cell(_tiny(precision="bf16", load="pretrained", steps=1).to_dict(), cache)
    assert r["status"] == "error" and "precision proof failed for bf16" in r["error"]


def _plain_lora_model(kind="llama"):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    return peft.get_peft_model(AutoModelForCausalLM.from_config(cfg), peft.LoraConfig(r=4, target_modules="all-linear"))


def test_the_liger_proof_fails_on_a_model_liger_did_not_patch():
    proof = liger.census(_plain_lora_model())
    assert proof["liger_modules"] == {} and proof["liger_modules_expected"] == {"LigerRMSNorm": 5, "LigerSwiGLUMLP": 2}
    found = liger.problems(proof)
    assert len(found) == 4 and "0 modules run LigerRMSNorm, expected 5" in found[0]
    assert any(p.startswith("RoPE is transformers.models.llama.modeling_llama.") for p in found)
    with pytest.raises(base.StackProofError, match="^Liger proof failed: "):
        liger.prove(None, _plain_lora_model())
    # at run time: a training step that built the logits did not use the fused loss
    assert liger.check_step(proof, {"train_step_logits": "None"}) == []
    assert "did not run" in liger.check_step(proof, {"train_step_logits": "Tensor[1, 32, 256]"})[0]


def test_the_unsloth_proof_names_each_missing_patch():
    good = {"device_type": "cuda", "patched_forwards": {"LlamaAttention": "LlamaAttention_fast_forward",
                                                        "LlamaForCausalLM": "_CausalLM_fast_forward"},
            "fast_path_modules": 6, "modules": 6, "fused_lora": {"qkv": 2, "o": 2, "mlp": 2, "layers": 2},
            "checkpoint_function": "UnslothCheckpointFunction", "transformers_checkpoint": "unsloth_checkpoint",
            "attention_backend": "sdpa"}
    assert unsloth.problems(good, "offload", True, "sdpa") == []
    assert "plain checkpointing was asked" in unsloth.problems(good, "on", True, "sdpa")[0]
    cpu = dict(good, device_type="cpu", fast_path_modules=0, attention_backend="xformers",
               patched_forwards={"LlamaAttention": "forward"}, checkpoint_function="CheckpointFunction")
    found = unsloth.problems(cpu, "offload", True, "sdpa")
    assert len(found) == 5 and found[0].startswith("unsloth.DEVICE_TYPE is cpu")
    assert found[-1] == "Unsloth's attention dispatch chose xformers, not sdpa"


def test_every_cell_runs_with_an_explicit_allocator_setting(monkeypatch):
    for var in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    out = {}
    base.cell_environment(out)
    assert out["pytorch_alloc_conf"] == os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:False"
    assert os.environ["UNSLOTH_COMPILE_LOCATION"].startswith("/tmp/") and os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the caller's, by its older name
    base.cell_environment(out)
    assert out["pytorch_alloc_conf"] == os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"


def test_spec_and_rules_of_the_stack_cells():
    with pytest.raises(SpecError, match="--compile needs >= 2 warm-up steps"):
        _tiny(compile=True, warmup_steps=1)
    with pytest.raises(SpecError, match="loads from a checkpoint"):
        _tiny(stack="unsloth", load="config")
    assert _tiny(stack="unsloth", precision="bf16").resolved_load() == "pretrained"
    gpu = {"use_gpu": True, "packages": {"liger-kernel": "0.8.5", "unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9"}}
    vlm = capability.verdict(CellSpec("tiny-qwen2.5-vl", "bf16", 512, stack="liger"), gpu)
    assert vlm.rule == "stack-model" and "qwen2_5_vl" in vlm.reason
    eager = capability.verdict(CellSpec("llama-3.1-8b", "bf16", 512, stack="unsloth", attn_implementation="eager"), gpu)
    assert eager.rule == "stack-attention" and "ignores attn_implementation=eager" in eager.reason
    compiled = CellSpec("tiny-llama", "fp32", 64, compile=True)
    assert capability.verdict(compiled, {"c_compiler": None}).rule == "compile-compiler"
    assert capability.verdict(compiled, {"c_compiler": "cc"}).supported
    assert capability.verdict(compiled, {}).supported  # not reported: no prediction


def test_the_worker_server_never_preloads_a_stack():
    """Liger and Unsloth patch transformers for the whole process: preloaded in the fork
    server they would patch every cell forked from it."""
    from harness.cell.server import PRELOAD

    assert not [m for m in PRELOAD if m.split(".")[0] in ("liger_kernel", "unsloth", "unsloth_zoo")]


# -- the stability suite across stacks ----------------------------------------------------

def test_stability_cells_of_other_stacks_are_compared_with_hf_bf16_of_the_same_seed():
    from harness.plan import suites

    gpu = {"has_gpu": True, "gpu_name": "NVIDIA H200", "compute_capability": "9.0", "bitsandbytes_installed": True}
    cells = suites.cells_for("stability", {"precision": "bf16,nf4-dq", "stack": "unsloth,liger",
                                           "stability_seeds": 2}, gpu)
    got = [(c.stack, c.precision, c.seed) for c in cells]
    # hf runs fp32 (its own reference) and bf16 (the other stacks' reference); no fp32 on other stacks
    assert [g for g in got if g[0] == "hf"] == [("hf", p, s) for p in ("fp32", "bf16", "nf4-dq") for s in (0, 1)]
    assert {g for g in got if g[0] != "hf"} == {(st, p, s) for st in ("liger", "unsloth") for p in ("bf16", "nf4-dq")
                                                for s in (0, 1)}
    by = {(c.stack, c.precision, c.seed): c for c in cells}
    uns = by[("unsloth", "nf4-dq", 1)]
    assert uns.cell_id == "llama-3.2-1b/nf4-dq/s256/gc-off/load-pretrained/stack-unsloth/stability/seed1"
    assert suites.reference_for(uns) == by[("hf", "bf16", 1)]  # the same tokens and seed, plain hf bf16
    assert suites.reference_for(by[("hf", "bf16", 1)]) == by[("hf", "fp32", 1)]
    # only hf: the suite is what it was
    assert all(c.stack == "hf" for c in suites.cells_for("stability", {"precision": "bf16"}, gpu))
    assert all(c.stack == "hf" for c in suites.cells_for("overflow", {"stack": "liger"}, gpu))


def test_a_stack_cells_loss_curve_is_judged_against_hf_bf16():
    from harness.report import stability

    def curve(start=6.9, end=4.9, n=100):
        return [start + (end - start) * i / (n - 1) for i in range(n)]

    def srec(losses, precision, stack="hf", seed=0):
        tag = "" if stack == "hf" else f"/stack-{stack}"
        return {"cell_id": f"m/{precision}{tag}/stability/{seed}", "model": "m", "precision": precision,
                "stack": stack, "status": "ok", "losses": losses,
                "spec": {"model": "m", "precision": precision, "stack": stack, "seed": seed}}

    recs = [srec(curve(), "fp32"), srec(curve(end=5.0), "bf16"), srec(curve(end=6.5), "bf16", "unsloth"),
            srec(curve(end=5.0), "nf4-dq", "liger")]
    results = stability.judge_all(recs, stability.Thresholds(min_drop=0.1))
    assert [(r.reference, r.verdict) for r in results] == [("fp32", "stable"), ("fp32", "stable"),
                                                          ("hf bf16", "unstable"), ("hf bf16", "stable")]
    assert results[2].problems[-1].startswith("diverged from hf bf16: final loss")
    assert results[2].reference_final_loss == pytest.approx(results[1].final_loss)
    verdicts = stability.judge_seeds([results[2]])
    assert verdicts.precision == "bf16 (unsloth)" and verdicts.ratio.what == "final / hf bf16"
    md = stability.report(recs)["markdown"]
    assert "| m | bf16 (unsloth) |" in md and "compared with plain hf bf16 of the same seed" in md
