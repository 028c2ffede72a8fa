"""Rules that predict whether a host can run a cell, as data in one place. Pure module.

Each rule looks at host facts (``harness.env.quick_facts`` or ``collect``) and a cell and
returns a reason when the cell cannot run. The worker checks again for real (a kernel
call), so a wrong prediction shows up as a disagreement rather than a wrong result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from harness.precision import get_mode
from harness.spec import CellSpec


@dataclass(frozen=True)
class Rule:
    name: str
    doc: str
    check: Callable[[CellSpec, dict[str, Any]], str | None]


def _cc(facts: dict[str, Any]) -> float | None:
    cc = facts.get("compute_capability")
    try:
        return float(cc) if cc else None
    except (TypeError, ValueError):
        return None


def _bf16(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if get_mode(cell.precision).weight_dtype != "bfloat16" or not facts.get("use_gpu"):
        return None
    cc = _cc(facts)
    if cc is not None and cc < 8.0:
        return f"bf16 needs compute capability >= 8.0 (Ampere); {facts.get('gpu_name')} is {cc:.1f}"
    return None


def _bnb(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if get_mode(cell.precision).quant is None and cell.optimizer != "adamw8bit":
        return None
    if not facts.get("bitsandbytes_installed"):
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def _gpu_asked(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if facts.get("device_pref") == "cuda" and not facts.get("has_gpu"):
        return "--device cuda asked for, but this host has no NVIDIA GPU"
    return None


RULES: tuple[Rule, ...] = (
    Rule("gpu-present", "--device cuda needs an NVIDIA GPU", _gpu_asked),
    Rule("bf16-cc80", "bf16 needs compute capability >= 8.0", _bf16),
    Rule("bnb-installed", "quantised modes and 8-bit optimizers need bitsandbytes", _bnb),
)


def predict(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    """The first reason ``cell`` cannot run on a host with ``facts``, or None."""
    for rule in RULES:
        reason = rule.check(cell, facts)
        if reason:
            return reason
    return None
