"""What every training stack shares in the cell (worker side): its errors, what it is
given to build a cell's model, the process environment every cell runs with, and the
import of a stack's package.

Liger and Unsloth patch transformers' classes and module functions for the whole process
(``apply_liger_kernel_to_llama`` replaces ``modeling_llama.apply_rotary_pos_emb``;
Unsloth's loader replaces ``LlamaAttention.forward`` and, with its offloaded
checkpointing, ``torch.utils.checkpoint.CheckpointFunction``). So they are imported and
applied only here, in the cell's own process: the worker server forks every cell from a
process that never imported them (``harness.cell.server.PRELOAD``), and the next cell
starts clean.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass
from typing import Any, Callable

from harness.core.axes import STACK_BY_NAME
from harness.core.spec import CellSpec

# torch's own default: set explicitly so that no library's import changes it for one stack
# only (unsloth_zoo sets expandable_segments:True at import when the variable is unset).
ALLOC_CONF_DEFAULT = "expandable_segments:False"
# Every cell's process: no network (the GPU hosts have none; Unsloth would otherwise try
# to download statistics and probe 8.8.8.8), Unsloth's compiled modules under /tmp
# rather than in the working tree, a broken GPU init raising instead of Unsloth quietly
# training on its CPU backend, and Liger's RoPE pinned to its Triton kernel (on sm90 a
# CuTe DSL kernel would win where nvidia-cutlass-dsl is importable).
CELL_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_DISABLE_CPU_FALLBACK": "1",
    "LIGER_KERNEL_BACKEND": "nvidia-triton",
}
# The packages whose versions make a stack (beyond what env.json records for the host).
VERSION_PACKAGES = {"hf": ("transformers", "peft"), "liger": ("liger-kernel", "triton"),
                    "unsloth": ("unsloth", "unsloth_zoo", "trl", "triton")}
# The import that must come first in an Unsloth cell (before its model code runs).
IMPORTS = {"liger": "liger_kernel", "unsloth": "unsloth"}


class StackUnavailable(RuntimeError):
    """The stack cannot run this cell here: the record is unsupported, with the reason."""


class StackProofError(RuntimeError):
    """The stack (or attention kernel, or compiler) asked for is not what ran: an error record."""


@dataclass
class Build:
    """What a stack gets to load a cell's model and add LoRA."""

    spec: CellSpec
    opts: dict[str, Any]
    device: Any
    hooks: Any  # harness.cell.hooks.CellHooks
    preset: dict[str, Any] | None
    skips: tuple[str, ...]
    bf16_ok: bool
    compute: str  # compute dtype of quantised modes
    out: dict[str, Any]
    log: Callable[[str], None]
    load_kwargs: dict[str, Any]  # from_pretrained / from_config keywords of the precision mode


def cell_environment(out: dict[str, Any]) -> None:
    """Set the environment every cell runs with (before CUDA starts and before any stack
    is imported); the allocator setting goes into the record."""
    for key, value in CELL_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", f"/tmp/unsloth_compiled_cache-{os.getuid()}")
    conf = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ALLOC_CONF_DEFAULT
    os.environ["PYTORCH_ALLOC_CONF"] = conf
    out["pytorch_alloc_conf"] = conf


def versions(stack: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in VERSION_PACKAGES.get(stack, ()):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def import_stack(spec: CellSpec, opts: dict[str, Any]) -> None:
    """Import the stack's package, first thing in the cell (Unsloth wants to come before
    the model code it patches). A host without a GPU, or an import that fails, makes the
    cell unsupported with the reason; the worker server is never touched."""
    module = IMPORTS.get(spec.stack)
    if module is None:
        return
    if STACK_BY_NAME[spec.stack].needs_gpu and not _cuda_here(opts):
        raise StackUnavailable(f"the {spec.stack} stack's kernels run on a CUDA GPU only; this cell runs on the CPU")
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, or Unsloth's NotImplementedError without a GPU
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise StackUnavailable(f"{module} cannot be imported here: {type(exc).__name__}: {first}") from exc


def _cuda_here(opts: dict[str, Any]) -> bool:
    if opts.get("device", "auto") == "cpu":
        return False
    import torch

    return bool(torch.cuda.is_available())  # NVML-based in the worker: does not start CUDA


def describe_output(res: Any) -> dict[str, str]:
    """The class of a training step's output and what its logits are, read before the
    output is dropped (holding it would keep the logits alive through backward)."""
    logits = getattr(res, "logits", None)
    if logits is None:
        shown = "None"
    elif type(logits).__name__ in ("Tensor", "Parameter"):  # a sentinel (EmptyLogits) raises on any use
        shown = f"Tensor{list(logits.shape)}"
    else:
        shown = type(logits).__name__
    return {"train_step_output": type(res).__name__, "train_step_logits": shown}
