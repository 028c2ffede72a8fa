"""The axes of the matrix as data: one entry per precision mode and per checkpointing mode.

Pure module (no torch). Everything else reads these entries: the spec normalises names
through them, the matrix presets take their members from them, the worker builds its
loading arguments and its layer proof from a mode's fields (``harness.cell.precision``),
the fit search and the sweep-cost tables ask whether a mode is quantised, and the charts
take their colours and titles from them. Adding a mode is one entry here plus, for a
precision, its loading and proof code in ``harness.cell.precision``.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.errors import SpecError


@dataclass(frozen=True)
class PrecisionMode:
    name: str
    # dtype of the (non-quantised) base weights; for quantised modes it is the dtype of
    # the modules left unquantised (embeddings, norms, lm_head) and equals compute dtype.
    weight_dtype: str | None
    quant: str | None = None  # None, "int8" or "4bit" (bitsandbytes layers)
    quant_type: str | None = None  # "nf4" / "fp4" for 4-bit
    double_quant: bool = False
    aliases: tuple[str, ...] = ()
    colour: str = "#333333"  # the same in every chart of every report
    presets: tuple[str, ...] = ("full",)  # matrix presets that sweep it
    summary: str = ""

    @property
    def bits(self) -> int:
        return {"int8": 8, "4bit": 4}.get(self.quant or "", 32 if self.weight_dtype == "float32" else 16)

    @property
    def quantised(self) -> bool:
        return self.quant is not None


@dataclass(frozen=True)
class CheckpointingMode:
    name: str
    aliases: tuple[str, ...] = ()
    colour: str = "#333333"
    line_style: str = "-"
    title: str = ""
    presets: tuple[str, ...] = ("smoke", "default", "full")
    summary: str = ""


PRECISION_MODES: tuple[PrecisionMode, ...] = (
    PrecisionMode("fp32", "float32", aliases=("float32",), colour="#7f7f7f", presets=("smoke", "default", "full"),
                  summary="32-bit weights, no autocast"),
    PrecisionMode("bf16", "bfloat16", aliases=("bfloat16",), colour="#1f77b4", presets=("smoke", "default", "full"),
                  summary="16-bit LoRA: bf16 weights, fp32 adapters, bf16 autocast"),
    PrecisionMode("fp16", "float16", aliases=("float16",), colour="#17becf", presets=("smoke", "full"),
                  summary="fp16 weights with dynamic loss scaling"),
    PrecisionMode("int8", None, quant="int8", aliases=("8bit",), colour="#d62728", presets=("smoke", "default", "full"),
                  summary="LLM.int8 base layers (bitsandbytes)"),
    PrecisionMode("nf4", None, quant="4bit", quant_type="nf4", aliases=("4bit",), colour="#2ca02c",
                  presets=("smoke", "default", "full"), summary="QLoRA: NF4 base layers"),
    PrecisionMode("fp4", None, quant="4bit", quant_type="fp4", colour="#bcbd22", presets=("smoke", "full"),
                  summary="FP4 base layers"),
    PrecisionMode("nf4-dq", None, quant="4bit", quant_type="nf4", double_quant=True,
                  aliases=("nf4dq", "nf4_dq", "qlora"), colour="#9467bd", presets=("smoke", "full"),
                  summary="NF4 with double-quantised constants"),
)

CHECKPOINTING_MODES: tuple[CheckpointingMode, ...] = (
    CheckpointingMode("off", aliases=("false",), colour="#444444", line_style="-",
                      title="no checkpointing (gc-off)", summary="every layer's activations stay on the device"),
    CheckpointingMode("on", aliases=("true",), colour="#1f77b4", line_style="--", title="checkpointing (gc-on)",
                      summary="transformers' non-reentrant checkpointing: layers recomputed in backward"),
    # Unsloth calls its offloaded checkpointing "unsloth"; accept the name people know.
    CheckpointingMode("offload", aliases=("unsloth",), colour="#ff7f0e", line_style=":",
                      title="checkpointing + CPU offload (gc-offload)",
                      summary="each layer's input kept in pinned host memory, the layer recomputed in backward"),
)

@dataclass(frozen=True)
class Stack:
    """A training stack: what loads the model and adds LoRA, and which kernels train it."""

    name: str
    packages: tuple[str, ...] = ()  # distributions it needs beyond transformers + peft
    needs_gpu: bool = False  # its kernels are Triton / CUDA only
    precisions: tuple[str, ...] | None = None  # precision modes its loader offers (None: all)
    min_seq_len_offload: int = 0  # below this its offloaded checkpointing turns into plain checkpointing
    model_types: tuple[str, ...] | None = None  # architectures (config model_type) it patches (None: any)
    attn_implementations: tuple[str, ...] | None = None  # --attn values it honours (None: all)
    extra: str = ""  # the package extra that installs it: pip install -e .[extra]
    colour: str = "#333333"
    summary: str = ""


STACKS: tuple[Stack, ...] = (
    Stack("hf", colour="#1f77b4", summary="transformers + peft, as they come"),
    Stack("liger", packages=("liger-kernel",), needs_gpu=True, extra="liger", colour="#2ca02c",
          model_types=("llama", "qwen2", "mistral"),
          summary="the same model with Liger kernels: fused linear cross-entropy, RMSNorm, SwiGLU, RoPE"),
    # Unsloth's 4-bit loader always double-quantises (nf4 with nested constants: our nf4-dq),
    # and its offloaded checkpointing is plain checkpointing below 512 tokens. Its fast
    # attention path ignores config._attn_implementation (its own dispatch: SDPA without
    # flash-attn / xformers), so only sdpa is what an Unsloth cell says it is.
    Stack("unsloth", packages=("unsloth", "unsloth_zoo"), needs_gpu=True, extra="unsloth",
          precisions=("bf16", "fp16", "int8", "nf4-dq"), min_seq_len_offload=512, colour="#d62728",
          model_types=("llama", "qwen2", "mistral"), attn_implementations=("sdpa",),
          summary="Unsloth's FastLanguageModel loading and get_peft_model"),
)
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2", "flex_attention")

MODES: dict[str, PrecisionMode] = {m.name: m for m in PRECISION_MODES}
STACK_BY_NAME: dict[str, Stack] = {s.name: s for s in STACKS}
STACK_NAMES: tuple[str, ...] = tuple(STACK_BY_NAME)
GC_MODES: dict[str, CheckpointingMode] = {m.name: m for m in CHECKPOINTING_MODES}
PRECISIONS: tuple[str, ...] = tuple(MODES)
GRAD_CKPT_MODES: tuple[str, ...] = tuple(GC_MODES)
PRECISION_ALIASES: dict[str, str] = {a: m.name for m in PRECISION_MODES for a in m.aliases}
GRAD_CKPT_ALIASES: dict[str, str] = {a: m.name for m in CHECKPOINTING_MODES for a in m.aliases}


def normalize_grad_ckpt(mode: str) -> str:
    m = str(mode).strip().lower()
    m = GRAD_CKPT_ALIASES.get(m, m)
    if m not in GC_MODES:
        raise SpecError(f"unknown gradient checkpointing mode {mode!r}; choose from {', '.join(GRAD_CKPT_MODES)} "
                        "(or 'unsloth' for offload)")
    return m


def normalize_precision(precision: str) -> str:
    p = str(precision).strip().lower()
    p = PRECISION_ALIASES.get(p, p)
    if p not in MODES:
        raise SpecError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return p


def normalize_stack(stack: str) -> str:
    s = str(stack).strip().lower()
    if s not in STACK_BY_NAME:
        raise SpecError(f"unknown training stack {stack!r}; choose from {', '.join(STACK_NAMES)}")
    return s


def normalize_attention(impl: str) -> str:
    a = str(impl).strip().lower()
    if a not in ATTENTION_IMPLEMENTATIONS:
        raise SpecError(f"unknown attention implementation {impl!r}; choose from {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    return a


def get_mode(precision: str) -> PrecisionMode:
    return MODES[normalize_precision(precision)]


def is_quantised(precision: object) -> bool:
    """Whether a precision name (as stored in any record; unknown names are not) loads
    bitsandbytes layers."""
    mode = MODES.get(str(precision))
    return bool(mode and mode.quantised)


def in_preset(preset: str, modes) -> tuple[str, ...]:
    """Names of the modes (precision or checkpointing entries) a matrix preset sweeps."""
    return tuple(m.name for m in modes if preset in m.presets)


def ordered(values, names: tuple[str, ...]) -> list[str]:
    """Distinct values in the registry's order; unknown ones last, alphabetically."""
    seen = {str(v) for v in values if v is not None and v == v}
    return [n for n in names if n in seen] + sorted(seen - set(names))


def compute_dtype_name(bf16_supported: bool) -> str:
    """Compute dtype of quantised modes: bf16 where the device supports it, else fp16."""
    return "bfloat16" if bf16_supported else "float16"
