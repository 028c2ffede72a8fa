"""The liger stack: the hf model with Liger's Triton kernels (liger-kernel 0.8.5).

``apply_liger_kernel_to_<arch>(model=model)`` runs on the loaded transformers model,
before LoRA: applied to a PeftModel it fails half-way (``base_model_prefix`` resolves to
the wrong object through PeftModel's ``__getattr__``, after RoPE was already replaced).
On the instance it binds Liger's forwards into each RMSNorm and MLP module (their class
stays ``LlamaRMSNorm`` / ``LlamaMLP``; ``_get_name()`` says ``LigerRMSNorm`` /
``LigerSwiGLUMLP``), binds the fused linear cross-entropy forward to the model, and
replaces the architecture module's ``apply_rotary_pos_emb`` for the whole process.

Proof (a failure is an error record): every norm and MLP re-pointed to a Liger forward,
RoPE replaced, the model's forward Liger's, and at run time the first training step's
output carries no logits: in train mode with labels the fused linear cross-entropy
computes the loss chunk by chunk and never builds the logits tensor.
"""

from __future__ import annotations

import importlib
from collections import Counter
from typing import Any

from harness.cell.stacks import hf
from harness.cell.stacks.base import Build, StackProofError, StackUnavailable

# config model_type -> the architecture's transformers module (where RoPE is replaced)
ARCHITECTURES = {"llama": "transformers.models.llama.modeling_llama",
                 "qwen2": "transformers.models.qwen2.modeling_qwen2",
                 "mistral": "transformers.models.mistral.modeling_mistral"}
LIGER_ROPE = "liger_kernel.transformers.rope.liger_rotary_pos_emb"
LIGER_FORWARDS = "liger_kernel.transformers.model."


def load(b: Build):
    model, info = hf.load(b)
    apply(model)
    return model, info


def apply(model) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise StackUnavailable(f"the liger stack is built here for {', '.join(ARCHITECTURES)} models; this one is {kind}")
    import liger_kernel.transformers as lt

    patch = getattr(lt, f"apply_liger_kernel_to_{kind}")
    # Every kernel named, so a library default can never choose for us; cross_entropy and
    # the fused linear cross-entropy exclude each other.
    patch(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True, model=model)


wrap = hf.wrap


def census(model) -> dict[str, Any]:
    """What Liger re-pointed in ``model`` (a PeftModel or the transformers model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(base.config, "model_type", None)
    found: Counter = Counter()
    for m in base.modules():
        name = m._get_name()
        fwd = vars(m).get("forward")
        if name.startswith("Liger") and str(getattr(fwd, "__module__", "")).startswith("liger_kernel"):
            found[name] += 1
    layers = int(getattr(base.config, "num_hidden_layers", 0) or 0)
    rope = getattr(importlib.import_module(ARCHITECTURES[kind]), "apply_rotary_pos_emb", None) \
        if kind in ARCHITECTURES else None
    forward = getattr(base.forward, "__func__", base.forward)
    return {"proof": "liger", "liger_modules": dict(sorted(found.items())),
            "liger_modules_expected": {"LigerRMSNorm": 2 * layers + 1, "LigerSwiGLUMLP": layers},
            # transformers 5.2x wraps it in a module-like object without a __name__
            "rope_function": f"{getattr(rope, '__module__', None)}.{getattr(rope, '__name__', None) or type(rope).__name__}",
            "loss_forward": str(getattr(forward, "__module__", None)), "rope_impl": _rope_impl()}


def _rope_impl() -> str | None:
    try:  # 0.8.5's kernel dispatcher; older releases have none
        from liger_kernel.backends import resolve_impl

        return str(resolve_impl("rope").impl_name)
    except Exception as exc:  # noqa: BLE001 - a fact, never fatal
        return f"unknown ({type(exc).__name__})"


def problems(proof: dict[str, Any]) -> list[str]:
    out = []
    got, want = proof["liger_modules"], proof["liger_modules_expected"]
    for name, n in want.items():
        if got.get(name, 0) != n:
            out.append(f"{got.get(name, 0)} modules run {name}, expected {n}")
    if proof["rope_function"] != LIGER_ROPE:
        out.append(f"RoPE is {proof['rope_function']}, not Liger's")
    if not proof["loss_forward"].startswith(LIGER_FORWARDS):
        out.append(f"the model's forward comes from {proof['loss_forward']}, not Liger's fused linear cross-entropy")
    return out


def prove(b: Build, model) -> dict[str, Any]:
    proof = census(model)
    found = problems(proof)
    if found:
        raise StackProofError("Liger proof failed: " + "; ".join(found))
    return proof


def check_step(proof: dict[str, Any] | None, first: dict[str, str]) -> list[str]:
    if first.get("train_step_logits") != "None":
        return [f"the training step's output ({first.get('train_step_output')}) held logits "
                f"{first.get('train_step_logits')}: the fused linear cross-entropy did not run"]
    return []
