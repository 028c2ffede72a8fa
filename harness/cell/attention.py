"""The attention implementation a cell's layers use, and the proof that it is the one
asked for (worker side).

transformers' attention layers look up their kernel at every forward from
``self.config._attn_implementation`` (``ALL_ATTENTION_FUNCTIONS.get_interface``), and each
layer's config is the model's (a VLM's vision blocks hold the vision config). So the value
every attention layer's config names after the LoRA wrap is what runs. Unsloth's fast
path ignores it (its own dispatch; its stack proof checks that instead).
"""

from __future__ import annotations

from typing import Any

from harness.cell.stacks.base import StackProofError
from harness.core.spec import CellSpec


def configured(model) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def used(model) -> str:
    """The implementations the model's attention layers name (comma-joined if several)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = [configured(m) for m in base.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]
    return ",".join(dict.fromkeys(str(v) for v in (seen or [configured(base)])))


def prove(spec: CellSpec, model, out: dict[str, Any]) -> None:
    out["attn_implementation_used"] = found = used(model)
    if spec.stack != "unsloth" and found != spec.attn_implementation:
        raise StackProofError(f"attention proof failed: the layers use {found}, not {spec.attn_implementation}")
