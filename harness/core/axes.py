"""The axes of the matrix as data: precision modes and checkpointing modes, their names,
aliases and what each means. Pure module (no torch): the planner, the worker, the fit
search and the reports all read these entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.errors import SpecError

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq")


GRAD_CKPT_MODES: tuple[str, ...] = ("off", "on", "offload")


# Unsloth calls its offloaded checkpointing "unsloth"; accept the name people know.
GRAD_CKPT_ALIASES: dict[str, str] = {"unsloth": "offload", "true": "on", "false": "off"}


def normalize_grad_ckpt(mode: str) -> str:
    m = str(mode).strip().lower()
    m = GRAD_CKPT_ALIASES.get(m, m)
    if m not in GRAD_CKPT_MODES:
        raise SpecError(
            f"unknown gradient checkpointing mode {mode!r}; choose from "
            f"{', '.join(GRAD_CKPT_MODES)} (or 'unsloth' for offload)"
        )
    return m


def normalize_precision(precision: str) -> str:
    p = str(precision).strip().lower()
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "8bit": "int8",
               "4bit": "nf4", "nf4dq": "nf4-dq", "nf4_dq": "nf4-dq", "qlora": "nf4-dq"}
    p = aliases.get(p, p)
    if p not in PRECISIONS:
        raise SpecError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return p


@dataclass(frozen=True)
class PrecisionMode:
    name: str
    # dtype of the (non-quantised) base weights; for quantised modes it is the dtype of
    # the modules left unquantised (embeddings, norms, lm_head) and equals compute dtype.
    weight_dtype: str | None
    quant: str | None = None  # None, "int8" or "4bit"
    quant_type: str | None = None  # "nf4" / "fp4" for 4-bit
    double_quant: bool = False

    @property
    def bits(self) -> int:
        return {"int8": 8, "4bit": 4}.get(self.quant or "", 32 if self.weight_dtype == "float32" else 16)


MODES: dict[str, PrecisionMode] = {
    "fp32": PrecisionMode("fp32", "float32"),
    "bf16": PrecisionMode("bf16", "bfloat16"),
    "fp16": PrecisionMode("fp16", "float16"),
    "int8": PrecisionMode("int8", None, quant="int8"),
    "nf4": PrecisionMode("nf4", None, quant="4bit", quant_type="nf4"),
    "fp4": PrecisionMode("fp4", None, quant="4bit", quant_type="fp4"),
    "nf4-dq": PrecisionMode("nf4-dq", None, quant="4bit", quant_type="nf4", double_quant=True),
}


def get_mode(precision: str) -> PrecisionMode:
    return MODES[normalize_precision(precision)]


def compute_dtype_name(bf16_supported: bool) -> str:
    """Compute dtype of quantised modes: bf16 where the device supports it, else fp16."""
    return "bfloat16" if bf16_supported else "float16"
