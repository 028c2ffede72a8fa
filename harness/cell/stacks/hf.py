"""The hf stack: transformers + peft as they come (the harness's path since its start).

Load: the cell hooks' loader (``harness.cell.build.load_model``: built from the config, or
``from_pretrained`` on the synthetic checkpoint; FSDP ranks build on the meta device).
Wrap: the checkpointing mode with its evidence hooks (``harness.cell.checkpointing``), then
``peft.get_peft_model``. No proof of its own beyond the layer census every cell gets.
"""

from __future__ import annotations

from typing import Any

from harness.cell.stacks.base import Build


def load(b: Build):
    return b.hooks.load(b.spec, b.load_kwargs, b.device, b.opts)


def wrap(b: Build, model):
    """The checkpointing mode (with its evidence hooks), then the LoRA adapter."""
    import peft
    import torch

    from harness.cell import checkpointing
    from harness.core.models import lora_exclude

    spec = b.spec
    evidence = checkpointing.apply(model, spec.grad_ckpt)
    lcfg = peft.LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                           target_modules=lora_target(spec.lora.target_modules), bias="none", task_type="CAUSAL_LM",
                           exclude_modules=lora_exclude(b.preset, spec.lora.include_vision))
    # LoRA's A matrices are drawn from the global RNG: seed it here so every precision and
    # load path of a cell starts from the same adapter (the stability suite compares them).
    torch.manual_seed(spec.seed)
    model = peft.get_peft_model(model, lcfg)
    input_cast(model, spec.lora.input_cast, b.out)
    # from_pretrained gave us an eval-mode model; transformers skips checkpointing in
    # eval mode. The checkpointing proof catches a loop that forgets this.
    if not b.opts.get("_test_forget_train_mode"):
        model.train()
    return model, evidence


def input_cast(model, enabled: bool, out: dict[str, Any]) -> None:
    if not enabled:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    out["lora_input_cast"] = enabled


def lora_target(target: str):
    return target if target == "all-linear" else [s.strip() for s in target.split(",") if s.strip()]


def prove(b: Build, model) -> dict[str, Any] | None:
    return None


def check_step(proof: dict[str, Any] | None, first: dict[str, str]) -> list[str]:
    return []
