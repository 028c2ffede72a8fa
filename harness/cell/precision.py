"""Precision modes: what each mode loads, the seed's flag rules, and the proof that what
was loaded is what was asked.

The rules and the proof are pure (no torch import at module level) so they are cheap to
test; ``load_kwargs`` and ``count_layers`` import torch / bitsandbytes when called.
"""

from __future__ import annotations


from typing import Any

from harness.core.errors import SpecError
from harness.core.axes import normalize_precision
from harness.core.axes import compute_dtype_name, get_mode


class PrecisionProofError(RuntimeError):
    """The loaded model's layers do not match the requested precision mode."""


# Modules that bitsandbytes loading leaves in 16-bit on purpose. transformers never
# quantises the output head; vision towers are listed by the model preset.
DEFAULT_SKIP_MODULES: tuple[str, ...] = ("lm_head",)


def resolve_flags(
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    dtype: str | None = None,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = False,
    bf16_supported: bool = True,
) -> str:
    """The seed's flag rules: loader flags -> precision mode.

    - both ``load_in_4bit`` and ``load_in_8bit``: an error, never a silent pick;
    - ``load_in_8bit``: ``int8``; ``load_in_4bit``: ``nf4`` / ``fp4`` / ``nf4-dq``;
    - neither: 16-bit LoRA. ``dtype`` picks fp32 / bf16 / fp16; with no dtype it is bf16
      where the device supports it, else fp16 (the seed's "16-bit is the default").
    """
    if load_in_4bit and load_in_8bit:
        raise SpecError("load_in_4bit and load_in_8bit are both set: choose one quantisation, or neither for 16-bit LoRA")
    if load_in_8bit:
        if dtype not in (None, "bfloat16", "bf16", "float16", "fp16"):
            raise SpecError(f"load_in_8bit with dtype={dtype!r}: int8 computes in bf16 or fp16")
        return "int8"
    if load_in_4bit:
        qt = str(bnb_4bit_quant_type).lower()
        if qt not in ("nf4", "fp4"):
            raise SpecError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {bnb_4bit_quant_type!r}")
        if bnb_4bit_use_double_quant:
            if qt != "nf4":
                raise SpecError("double quantisation is offered with nf4 only (mode nf4-dq)")
            return "nf4-dq"
        return qt
    if bnb_4bit_use_double_quant:
        raise SpecError("bnb_4bit_use_double_quant without load_in_4bit has no effect; set load_in_4bit=True or drop it")
    if dtype is None or str(dtype).lower() == "auto":
        return "bf16" if bf16_supported else "fp16"
    mode = normalize_precision(str(dtype).replace("torch.", ""))
    if mode not in ("fp32", "bf16", "fp16"):
        raise SpecError(f"dtype {dtype!r} is not a 16/32-bit dtype")
    if mode == "bf16" and not bf16_supported:
        raise SpecError("dtype=bfloat16 asked for, but this device does not support bf16 (compute capability < 8.0); use float16")
    return mode


def load_kwargs(precision: str, *, bf16_supported: bool, skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` / ``from_config`` for this mode.

    Every quantisation parameter is set explicitly (the seed's advice), so a library
    default can never choose for us.
    """
    import torch

    mode = get_mode(precision)
    if mode.quant is None:
        return {"dtype": getattr(torch, mode.weight_dtype)}
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, compute_dtype_name(bf16_supported))
    if mode.quant == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True, load_in_4bit=False, llm_int8_skip_modules=list(skip_modules))
    else:
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            load_in_8bit=False,
            bnb_4bit_quant_type=mode.quant_type,
            bnb_4bit_use_double_quant=mode.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
            llm_int8_skip_modules=list(skip_modules),
        )
    return {"dtype": compute, "quantization_config": qc}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _kept_by(name: str, skip_modules: tuple[str, ...]) -> str | None:
    """The skip entry covering module ``name``: a module name (``lm_head``) or a dotted
    path (``model.visual``) occurring as whole components anywhere in the name, so it
    also matches under wrappers (``base_model.model.model.visual.blocks.0.attn.qkv``)."""
    parts = name.split(".")
    for s in skip_modules:
        sp = s.split(".")
        if any(parts[i:i + len(sp)] == sp for i in range(len(parts) - len(sp) + 1)):
            return s
    return None


def count_layers(model: Any, skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES, *,
                 quantized: bool = True) -> dict[str, Any]:
    """Count the model's linear layers by kind, looking at the modules themselves.

    LoRA's own adapter matrices (lora_A / lora_B) are not base layers and are counted
    apart. With ``quantized``, ``unexpected_plain`` names plain linear layers outside
    ``skip_modules``: each of them is a layer that did not get quantised.
    """
    import torch

    try:
        import bitsandbytes as bnb

        l4, l8 = bnb.nn.Linear4bit, bnb.nn.Linear8bitLt
    except Exception:  # bitsandbytes missing or broken: nothing can be bnb-quantised
        l4 = l8 = ()

    counts: dict[str, Any] = {
        "linear4bit": {"count": 0, "quant_types": {}, "double_quant": 0, "compute_dtypes": {}},
        "linear8bit": {"count": 0},
        "linear": {"count": 0, "dtypes": {}},
        "unexpected_plain": [],
        "kept_unquantized": {},  # quantised modes: plain layers per skip_modules entry
        "lora_layers": 0,
        "lora_adapter_dtypes": {},
    }

    def bump(d: dict, key: str) -> None:
        d[key] = d.get(key, 0) + 1

    for name, mod in model.named_modules():
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            if isinstance(mod, torch.nn.Linear):
                bump(counts["lora_adapter_dtypes"], _dtype_name(mod.weight.dtype))
            continue
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            counts["lora_layers"] += 1
            continue
        clean = name.replace(".base_layer", "")
        if l4 and isinstance(mod, l4):
            c = counts["linear4bit"]
            c["count"] += 1
            w = mod.weight
            bump(c["quant_types"], str(getattr(w, "quant_type", "unknown")))
            qs = getattr(w, "quant_state", None)
            if qs is not None and getattr(qs, "nested", False):
                c["double_quant"] += 1
            bump(c["compute_dtypes"], _dtype_name(getattr(mod, "compute_dtype", None)))
        elif l8 and isinstance(mod, l8):
            counts["linear8bit"]["count"] += 1
        elif isinstance(mod, torch.nn.Linear):
            counts["linear"]["count"] += 1
            bump(counts["linear"]["dtypes"], _dtype_name(mod.weight.dtype))
            kept = _kept_by(clean, skip_modules)
            if quantized and kept is None:
                counts["unexpected_plain"].append(clean)
            elif quantized:  # left in 16-bit on purpose: say where (e.g. a VLM's vision tower)
                bump(counts["kept_unquantized"], kept)
    # Keep the record short: the first few names tell the story.
    n_unexpected = len(counts["unexpected_plain"])
    counts["unexpected_plain"] = counts["unexpected_plain"][:8]
    counts["unexpected_plain_count"] = n_unexpected
    return counts


def verify_layers(precision: str, counts: dict[str, Any], *, compute_dtype: str) -> list[str]:
    """Problems with the loaded layers for this mode; an empty list means proven.

    A 16-bit cell with any 4-bit or 8-bit layer fails, and so does a quantised cell with
    a layer of the wrong kind, quant type, double-quant flag or compute dtype.
    """
    mode = get_mode(precision)
    n4 = counts["linear4bit"]["count"]
    n8 = counts["linear8bit"]["count"]
    problems: list[str] = []
    if counts.get("lora_layers", 0) == 0:
        problems.append("no LoRA layers were attached")
    if mode.quant is None:
        if n4:
            problems.append(f"{n4} 4-bit (Linear4bit) layers loaded in a {mode.name} cell")
        if n8:
            problems.append(f"{n8} 8-bit (Linear8bitLt) layers loaded in a {mode.name} cell")
        other = {d: n for d, n in counts["linear"]["dtypes"].items() if d != mode.weight_dtype}
        if other:
            problems.append(f"plain linear layers in {other} instead of {mode.weight_dtype}")
        return problems
    unexpected = counts.get("unexpected_plain_count", len(counts.get("unexpected_plain", [])))
    if unexpected:
        problems.append(
            f"{unexpected} linear layers were not quantised (e.g. {', '.join(counts['unexpected_plain'][:3])})"
        )
    if mode.quant == "int8":
        if n4:
            problems.append(f"{n4} 4-bit (Linear4bit) layers loaded in an int8 cell")
        if not n8:
            problems.append("no 8-bit (Linear8bitLt) layers loaded in an int8 cell")
        return problems
    if n8:
        problems.append(f"{n8} 8-bit (Linear8bitLt) layers loaded in a {mode.name} cell")
    if not n4:
        problems.append(f"no 4-bit (Linear4bit) layers loaded in a {mode.name} cell")
        return problems
    qts = counts["linear4bit"]["quant_types"]
    if set(qts) != {mode.quant_type}:
        problems.append(f"4-bit quant types {qts}, expected all {mode.quant_type}")
    dq = counts["linear4bit"]["double_quant"]
    if mode.double_quant and dq != n4:
        problems.append(f"double quantisation on {dq} of {n4} 4-bit layers, expected all")
    if not mode.double_quant and dq:
        problems.append(f"double quantisation on {dq} 4-bit layers, expected none")
    cds = counts["linear4bit"]["compute_dtypes"]
    if set(cds) != {compute_dtype}:
        problems.append(f"4-bit compute dtypes {cds}, expected {compute_dtype}")
    return problems
