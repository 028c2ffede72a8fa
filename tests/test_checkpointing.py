"""Checkpointing modes do what they claim, and the proofs catch what they must."""

import math

import pytest

from harness.cell.checkpointing import verify
from harness.core.spec import CellSpec
from harness.cell.train import run_cell


def _ev(mode, fwd=10, rec=0, off=0):
    return {"mode": mode, "layer_runs_forward": fwd, "layer_recomputes": rec, "offloaded_tensors": off}


def test_verify_rules():
    assert verify("off", _ev("off")) == []
    assert verify("off", _ev("off", rec=10))
    assert verify("on", _ev("on", rec=10)) == []
    assert "eval mode" in verify("on", _ev("on", rec=0))[0]
    assert verify("on", _ev("on", rec=10, off=10))
    assert verify("offload", _ev("offload", rec=10, off=10)) == []
    assert verify("offload", _ev("offload", rec=10, off=0))
    assert verify("offload", _ev("offload", fwd=0))


def _cell(**kw):
    base = dict(model="tiny-llama", precision="fp32", seq_len=64, warmup_steps=1, steps=2, lr=3e-3)
    base.update(kw)
    return CellSpec(**base).to_dict()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return {"cache_dir": str(tmp_path_factory.mktemp("ckpt-cache"))}


def test_modes_give_the_same_training_and_the_evidence_differs(cache):
    recs = {m: run_cell(_cell(grad_ckpt=m), cache) for m in ("off", "on", "offload")}
    for m, r in recs.items():
        assert r["status"] == "ok", (m, r["error"])
    # Recomputation and offloading change where activations live, not the maths.
    for m in ("on", "offload"):
        assert recs[m]["losses"] == pytest.approx(recs["off"]["losses"], rel=1e-5)
    ev = {m: r["grad_ckpt_evidence"] for m, r in recs.items()}
    steps, layers = 3, 2
    assert ev["off"]["layer_recomputes"] == 0 and ev["off"]["offloaded_bytes"] == 0
    assert ev["on"]["layer_recomputes"] == steps * layers and ev["on"]["offloaded_bytes"] == 0
    assert ev["offload"]["layer_recomputes"] == steps * layers
    # every layer input (64 tokens x 128 hidden, fp32) went to host memory, every step
    assert ev["offload"]["offloaded_bytes"] == steps * layers * 64 * 128 * 4
    # the activations autograd kept outside checkpointed layers shrink with checkpointing
    assert ev["on"]["saved_activation_bytes_step0"] < ev["off"]["saved_activation_bytes_step0"]
    assert all(e["lora_params_with_grad"] == e["lora_params"] == 28 for e in ev.values())


def test_forgetting_train_mode_fails_the_checkpointing_proof(cache):
    """from_pretrained returns an eval-mode model, where transformers skips
    checkpointing: a loop that forgets model.train() must not pass as gc-on."""
    r = run_cell(_cell(precision="bf16", grad_ckpt="on", load="pretrained"), dict(cache, _test_forget_train_mode=True))
    assert r["status"] == "error"
    assert "checkpointing proof failed" in r["error"] and "0 layer recomputations" in r["error"]
    assert r["grad_ckpt_evidence"]["model_training_mode"] is False
    ok = run_cell(_cell(precision="bf16", grad_ckpt="on", load="pretrained"), cache)
    assert ok["status"] == "ok" and ok["loaded_in_training_mode"] is False  # what from_pretrained gave


def test_a_silently_quantised_16bit_cell_fails_the_precision_proof(cache, monkeypatch):
    """The seed's failure: 16-bit asked, 4-bit loaded by a wrapper. The layer count catches it."""
    import harness.cell.setup as wl
    from harness.cell.precision import load_kwargs as real

    monkeypatch.setattr(wl, "load_kwargs", lambda precision, **kw: real("nf4", **kw))
    r = run_cell(_cell(precision="bf16", grad_ckpt="off", load="pretrained"), cache)
    assert r["status"] == "error"
    assert "precision proof failed for bf16" in r["error"] and "14 4-bit (Linear4bit) layers" in r["error"]
    assert r["loaded_layers"]["linear4bit"]["count"] == 14


def test_fp16_uses_loss_scaling_and_finite_losses(cache):
    r = run_cell(_cell(precision="fp16", grad_ckpt="offload"), cache)
    assert r["status"] == "ok", r["error"]
    assert r["loss_scaling"] is True and r["scaler_skipped_steps"] is not None
    assert r["adapter_dtype"] == "float32" and r["autocast_dtype"] == "float16"
    assert all(math.isfinite(x) for x in r["losses"])


def test_int8_keeps_layer_inputs_on_autograd_contexts_that_checkpointing_cannot_free(cache):
    """bitsandbytes' 8-bit matmul stores its input on ``ctx`` (not save_for_backward):
    with gc-on every int8 linear's input stays alive through the forward pass. The probe
    finds exactly those bytes; bf16 / nf4 and the offload mode hold none."""
    recs = {(p, m): run_cell(_cell(precision=p, grad_ckpt=m, seq_len=32, steps=1, load="pretrained"), cache)
            for p, m in (("int8", "on"), ("int8", "offload"), ("nf4", "on"), ("bf16", "on"))}
    for key, r in recs.items():
        assert r["status"] == "ok", (key, r["error"])
    held = {k: r["grad_ckpt_evidence"]["ctx_held_activation_bytes_step0"] for k, r in recs.items()}
    # per decoder layer the inputs of q/k/v (one tensor), o, gate/up (one) and down:
    # 3 x hidden 128 + intermediate 256, for 32 tokens, in the 2-byte compute dtype, 2 layers
    assert held[("int8", "on")] == 2 * (3 * 128 + 256) * 32 * 2
    fns = recs[("int8", "on")]["grad_ckpt_evidence"]["ctx_held_by_function"]
    assert set(fns) <= {"MatMul8bitFp", "MatMul8bitLt"} and sum(f["tensors"] for f in fns.values()) == 8
    assert "gc-on cannot free them" in recs[("int8", "on")]["warnings"][0]
    # the offload mode runs each layer's forward without a graph: nothing is held
    assert held[("int8", "offload")] == 0 and not recs[("int8", "offload")].get("warnings")
    assert held[("nf4", "on")] == 0 and held[("bf16", "on")] == 0


def test_the_held_bytes_probe_sees_a_custom_function_that_keeps_its_input():
    import torch
    from harness.cell.checkpointing import Evidence, ctx_held_warning

    class Keeps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.x = x  # the pattern the probe exists for
            ctx.w = w
            return x @ w

        @staticmethod
        def backward(ctx, g):
            return g @ ctx.w.t(), None

    class Saves(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g @ w.t(), None

    w = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    model = torch.nn.Module()
    model.w = w
    ev = Evidence.__new__(Evidence)
    x = torch.randn(4, 8, requires_grad=True)
    y = Keeps.apply(x * 2, w)
    z = Saves.apply(y, w).sum()
    ev.probe_ctx_held(z, torch.device("cpu"), model)
    assert ev.ctx_held_bytes == 4 * 8 * 4  # only Keeps' input; the weight is a parameter
    assert ev.ctx_held_by_function == {"Keeps": {"bytes": 128, "tensors": 1}}
    assert ctx_held_warning("off", {"ctx_held_activation_bytes_step0": 128}) is None
    assert "gc-on" in ctx_held_warning("on", {"ctx_held_activation_bytes_step0": 128,
                                              "ctx_held_by_function": ev.ctx_held_by_function})


def test_turning_off_peft_input_cast_drops_the_duplicated_inputs_and_changes_no_number(cache):
    """peft casts each LoRA layer's input to the fp32 adapter dtype and autocast casts it
    back: layers sharing an input (q / k / v, gate / up) each save a private bf16 copy.
    Without the cast they share one: 4 x hidden fewer values per token and layer, and
    bit-identical losses (bf16 -> fp32 -> bf16 is exact)."""
    from harness.core.spec import LoraSpec

    cells = {cast: CellSpec(model="tiny-llama", precision="bf16", seq_len=32, grad_ckpt="off", warmup_steps=1,
                            steps=1, load="pretrained", lora=LoraSpec(input_cast=cast)) for cast in (True, False)}
    assert cells[False].cell_id.endswith("/lora-nocast") and "nocast" not in cells[True].cell_id
    recs = {cast: run_cell(c.to_dict(), cache) for cast, c in cells.items()}
    for r in recs.values():
        assert r["status"] == "ok", r["error"]
    saved = {cast: r["grad_ckpt_evidence"]["saved_activation_bytes_step0"] for cast, r in recs.items()}
    assert saved[True] - saved[False] == 4 * 128 * 32 * 2 * 2  # 4 x hidden, 32 tokens, bf16, 2 layers
    assert recs[True]["losses"] == recs[False]["losses"]
    assert recs[True]["lora_input_cast"] is True and recs[False]["lora_input_cast"] is False


def test_offload_variants_compute_the_same_and_say_which_ran(cache, monkeypatch):
    """benchmarks/offload_memory.py's variants differ in how the copy reaches the host on
    CUDA, never in the maths: on the CPU all make the same copy, so the losses match."""
    from harness.cell.checkpointing import OFFLOAD_VARIANT_ENV, OFFLOAD_VARIANTS

    recs = {}
    for v in OFFLOAD_VARIANTS:
        monkeypatch.setenv(OFFLOAD_VARIANT_ENV, v)
        recs[v] = run_cell(_cell(grad_ckpt="offload"), cache)
    monkeypatch.delenv(OFFLOAD_VARIANT_ENV)
    default = run_cell(_cell(grad_ckpt="offload"), cache)
    assert default["grad_ckpt_evidence"]["offload_variant"] == "record-stream"
    for v, r in recs.items():
        assert r["status"] == "ok", r.get("error")
        assert r["grad_ckpt_evidence"]["offload_variant"] == v
        assert r["losses"] == default["losses"]
    assert "offload_variant" not in run_cell(_cell(grad_ckpt="on"), cache)["grad_ckpt_evidence"]
    monkeypatch.setenv(OFFLOAD_VARIANT_ENV, "sideways")
    bad = run_cell(_cell(grad_ckpt="offload"), cache)
    assert bad["status"] == "error" and "LORA_HARNESS_OFFLOAD_VARIANT='sideways': use one of" in bad["error"]
