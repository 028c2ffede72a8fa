"""Capability rules of the training-stack axis (``--stack``, ``--attn``, ``--compile``).

Pure module, part of ``harness.plan.capability`` (which lists them in ``RULES``): each
looks at a cell and the host's facts and returns why the cell cannot run, or None. The
stacks' own requirements come from their registry entry (``harness.core.axes.STACKS``).
"""

from __future__ import annotations

from typing import Any

from harness.core.axes import STACK_BY_NAME
from harness.core.models import get_preset
from harness.core.errors import SpecError
from harness.core.spec import CellSpec

SRC_LIGER = "liger-kernel: Triton kernels (README: NVIDIA / AMD GPUs); its first kernel call fails without a GPU driver"
SRC_UNSLOTH = ("unsloth 2026.10.9: models/llama.py (4-bit loads use nf4 + double quantisation; the fast attention "
               "path ignores config._attn_implementation), models/_utils.py (offloaded checkpointing becomes plain "
               "checkpointing below 512 tokens)")


def _pkg(facts: dict[str, Any], name: str) -> str | None:
    return (facts.get("packages") or {}).get(name)


def stack_installed(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    stack = STACK_BY_NAME[cell.stack]
    missing = [p for p in stack.packages if not _pkg(facts, p)]
    if missing:
        return (f"the {stack.name} stack needs {', '.join(missing)}, not installed here "
                f"(pip install -e .[{stack.extra}]; GPU hosts without network: docs/gpu-host.md)")
    return None


def stack_gpu(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    stack = STACK_BY_NAME[cell.stack]
    if stack.needs_gpu and not facts.get("use_gpu"):
        return f"the {stack.name} stack's kernels run on a CUDA GPU only; this cell would run on the CPU"
    return None


def stack_versions(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    unmet = [f"{d}: {', '.join(r)}" for d, r in (facts.get("stack_requirements") or {}).items()
             if r and d in STACK_BY_NAME[cell.stack].packages]
    if unmet:
        return f"the {cell.stack} stack's installed release does not accept this environment ({'; '.join(unmet)})"
    return None


def stack_precision(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    stack = STACK_BY_NAME[cell.stack]
    if stack.precisions is not None and cell.precision not in stack.precisions:
        return (f"the {stack.name} stack's loader offers {', '.join(stack.precisions)}, not {cell.precision}"
                + (" (its 4-bit loads are NF4 with double quantisation: nf4-dq)" if cell.precision == "nf4" else ""))
    return None


def stack_offload_length(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    stack = STACK_BY_NAME[cell.stack]
    if cell.grad_ckpt == "offload" and cell.seq_len < stack.min_seq_len_offload:
        return (f"the {stack.name} stack runs plain checkpointing instead of its offloaded mode below "
                f"{stack.min_seq_len_offload} tokens: a gc-offload cell of {cell.seq_len} tokens would not be what it says")
    return None


def stack_single_process(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if cell.world_size > 1 and (cell.stack != "hf" or cell.compile):
        return "torchrun cells run the plain stack without torch.compile (other stacks there are not built)"
    return None


def model_type(cell: CellSpec) -> str | None:
    """The preset's architecture (config model_type); None for local checkpoints."""
    if cell.model_path:
        return None
    try:
        return str(get_preset(cell.model)["config"].get("model_type"))
    except SpecError:
        return None


def stack_model(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    stack = STACK_BY_NAME[cell.stack]
    kind = model_type(cell)
    if stack.model_types is not None and kind is not None and kind not in stack.model_types:
        return (f"the {stack.name} stack is built here for {', '.join(stack.model_types)} models; "
                f"{cell.model} is {kind}")
    return None


def stack_attention(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    stack = STACK_BY_NAME[cell.stack]
    if stack.attn_implementations is not None and cell.attn_implementation not in stack.attn_implementations:
        return (f"the {stack.name} stack's fast path picks its own attention kernel and ignores "
                f"attn_implementation={cell.attn_implementation} (it honours {', '.join(stack.attn_implementations)})")
    return None


def compile_compiler(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if cell.compile and "c_compiler" in facts and not facts["c_compiler"]:
        return ("torch.compile's Inductor backend compiles C++ kernels (CPU) or Triton's launchers (GPU) with a C "
                "compiler; none (cc, gcc, clang) is on this host's PATH")
    return None
