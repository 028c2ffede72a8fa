"""Rules that predict whether a host can run a cell, as data in one place. Pure module.

Each rule looks at host facts (``harness.core.host.quick_facts``, plus ``use_gpu`` and
``device_pref`` from the sweep) and a cell, and returns a reason when the cell cannot
run. Facts a rule needs but the host did not report (an unknown version, no compute
capability) make the rule stay silent: a prediction is only made from what is known.

The worker checks again for real (a kernel call, then a training step), so a wrong
prediction shows up as a disagreement rather than a wrong result; the compatibility
suite attempts every cell and reports those disagreements (``harness.report.compat``).

Every rule names the documentation its threshold comes from (``Rule.source``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from harness.core.axes import get_mode
from harness.core.spec import CellSpec
from harness.plan import stack_rules as sr


@dataclass(frozen=True)
class Rule:
    name: str
    doc: str
    check: Callable[[CellSpec, dict[str, Any]], str | None]
    source: str = ""


@dataclass(frozen=True)
class Prediction:
    """What the rules say about one cell on one host."""

    supported: bool
    rule: str | None = None  # the first rule that fired
    reason: str | None = None
    # Every rule that fired (a host can fail several), as (name, reason) pairs.
    fired: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"supported": self.supported, "rule": self.rule, "reason": self.reason,
                "fired": [list(f) for f in self.fired]}


# -- fact helpers ----------------------------------------------------------------------

def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'2.11.0+cu130' -> (2, 11, 0); '0.50.2' -> (0, 50, 2); None or junk -> None.

    Only the leading release numbers count (local tags and pre-release suffixes are
    dropped): the floors below are release numbers.
    """
    if not text:
        return None
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if not m:
        return None
    return tuple(int(x) for x in m.group(1).split("."))


def _at_least(found: str | None, floor: str) -> bool | None:
    """found >= floor, or None when ``found`` is unknown."""
    f = parse_version(found)
    if f is None:
        return None
    need = parse_version(floor) or ()
    width = max(len(f), len(need))
    return f + (0,) * (width - len(f)) >= need + (0,) * (width - len(need))


def _pkg(facts: dict[str, Any], name: str) -> str | None:
    return (facts.get("packages") or {}).get(name)


def _cc(facts: dict[str, Any]) -> float | None:
    cc = facts.get("compute_capability")
    try:
        return float(cc) if cc else None
    except (TypeError, ValueError):
        return None


def _major(version: str | None) -> int | None:
    v = parse_version(version)
    return v[0] if v else None


def _quantised(cell: CellSpec) -> bool:
    return get_mode(cell.precision).quant is not None


def _gpu(facts: dict[str, Any]) -> bool:
    return bool(facts.get("use_gpu"))


# -- the data: thresholds and where they come from ----------------------------------------

BF16_MIN_CC = 8.0  # bf16 tensor-core arithmetic arrived with Ampere
CUDA13_MIN_CC = 7.5  # CUDA 13 removed Maxwell, Pascal and Volta (cc < 7.5)
BNB_INT8_MIN_CC = 7.5  # LLM.int8()
BNB_4BIT_MIN_CC = 6.0  # NF4/FP4 and 8-bit optimizers (PyPI builds from 0.48)
FLASH_ATTN2_MIN_CC = 8.0
TRANSFORMERS5_MIN_TORCH = "2.6"  # transformers 5.x: Requires-Dist torch>=2.6
TRANSFORMERS5_MIN_BNB = "0.46.1"  # transformers.utils.import_utils.BITSANDBYTES_MIN_VERSION
TRANSFORMERS5_MIN_ACCELERATE = "1.1.0"  # ACCELERATE_MIN_VERSION (quantised loading needs it)
BNB_CPU_MIN = "0.48.0"  # first release with official CPU support (no IPEX needed)
# bitsandbytes release -> the torch it needs (installation guide's system requirements).
BNB_TORCH_FLOORS: tuple[tuple[str, str], ...] = (("0.50.0", "2.4"), ("0.48.0", "2.3"))

SRC_BF16 = "NVIDIA Ampere architecture (bf16 tensor cores); torch.cuda.is_bf16_supported"
SRC_CUDA_MVC = "https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html"
SRC_CUDA13 = "CUDA 12.9/13.0 release notes: Maxwell, Pascal and Volta (cc < 7.5) removed in CUDA 13"
SRC_BNB_INSTALL = "https://huggingface.co/docs/bitsandbytes/v0.50.0/installation"
SRC_TRANSFORMERS = "transformers 5.x: package metadata (torch>=2.6) and utils/import_utils.py minimum versions"
SRC_FLASH = "flash-attn README: FlashAttention-2 supports Ampere, Ada and Hopper GPUs"


# -- the rules -------------------------------------------------------------------------

def _gpu_asked(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if facts.get("device_pref") == "cuda" and not facts.get("has_gpu"):
        return "--device cuda asked for, but this host has no NVIDIA GPU"
    return None


def _torch_cpu_build(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if facts.get("device_pref") == "cuda" and facts.get("has_gpu") and facts.get("torch_cuda_version") is None \
            and _pkg(facts, "torch"):
        return f"--device cuda asked for, but torch {_pkg(facts, 'torch')} is a CPU-only build"
    return None


def _cuda_driver(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if not _gpu(facts):
        return None
    built, drv = facts.get("torch_cuda_version"), facts.get("driver_cuda_version")
    bm, dm = _major(built), _major(drv)
    if bm is not None and dm is not None and bm > dm:
        return (f"torch is built for CUDA {built}, but the NVIDIA driver supports CUDA {drv} only "
                f"(a CUDA {bm}.x build needs a CUDA {bm} driver)")
    return None


def _cuda13_arch(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    cc, bm = _cc(facts), _major(facts.get("torch_cuda_version"))
    if _gpu(facts) and cc is not None and bm is not None and bm >= 13 and cc < CUDA13_MIN_CC:
        return (f"torch is built for CUDA {facts.get('torch_cuda_version')}, which has no kernels for compute "
                f"capability {cc:.1f} ({facts.get('gpu_name')}); CUDA 13 needs >= {CUDA13_MIN_CC}")
    return None


def _transformers_torch(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    tf, torch_v = _pkg(facts, "transformers"), _pkg(facts, "torch")
    if _major(tf) is not None and _major(tf) >= 5 and _at_least(torch_v, TRANSFORMERS5_MIN_TORCH) is False:
        return f"transformers {tf} needs torch >= {TRANSFORMERS5_MIN_TORCH}; torch {torch_v} is installed"
    return None


def _bf16(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if get_mode(cell.precision).weight_dtype != "bfloat16" or not _gpu(facts):
        return None
    cc = _cc(facts)
    if cc is not None and cc < BF16_MIN_CC:
        return f"bf16 needs compute capability >= 8.0 (Ampere); {facts.get('gpu_name')} is {cc:.1f}"
    return None


def _needs_bnb(cell: CellSpec) -> bool:
    return _quantised(cell) or cell.optimizer == "adamw8bit"


def _bnb(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if not _needs_bnb(cell):
        return None
    if not facts.get("bitsandbytes_installed"):
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def _bnb_for_transformers(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if not _quantised(cell):
        return None
    tf, bnb = _pkg(facts, "transformers"), _pkg(facts, "bitsandbytes")
    if _major(tf) is not None and _major(tf) >= 5 and _at_least(bnb, TRANSFORMERS5_MIN_BNB) is False:
        return f"transformers {tf} loads bitsandbytes layers only with bitsandbytes >= {TRANSFORMERS5_MIN_BNB}; found {bnb}"
    return None


def _accelerate(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if not _quantised(cell) or "packages" not in facts:
        return None
    acc = _pkg(facts, "accelerate")
    if acc is None:
        return "quantised loading in transformers needs accelerate, which is not installed"
    if _at_least(acc, TRANSFORMERS5_MIN_ACCELERATE) is False:
        return f"quantised loading needs accelerate >= {TRANSFORMERS5_MIN_ACCELERATE}; found {acc}"
    return None


def _bnb_torch(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if not _needs_bnb(cell):
        return None
    bnb, torch_v = _pkg(facts, "bitsandbytes"), _pkg(facts, "torch")
    for release, torch_floor in BNB_TORCH_FLOORS:
        if _at_least(bnb, release):
            if _at_least(torch_v, torch_floor) is False:
                return f"bitsandbytes {bnb} needs torch >= {torch_floor}; torch {torch_v} is installed"
            return None
    return None


def _bnb_cpu(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if not _needs_bnb(cell) or _gpu(facts):
        return None
    bnb = _pkg(facts, "bitsandbytes")
    if _at_least(bnb, BNB_CPU_MIN) is False:
        return f"bitsandbytes {bnb} has no CPU backend (official CPU support starts with {BNB_CPU_MIN})"
    return None


def _bnb_cc(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    cc = _cc(facts)
    if not _gpu(facts) or cc is None or not _needs_bnb(cell):
        return None
    mode = get_mode(cell.precision)
    if mode.quant == "int8" and cc < BNB_INT8_MIN_CC:
        return f"LLM.int8() (bitsandbytes 8-bit layers) needs compute capability >= {BNB_INT8_MIN_CC}; this GPU is {cc:.1f}"
    if cc < BNB_4BIT_MIN_CC:
        return f"bitsandbytes' PyPI builds need compute capability >= {BNB_4BIT_MIN_CC}; this GPU is {cc:.1f}"
    return None


def _flash_attn(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if cell.attn_implementation != "flash_attention_2":
        return None
    if not _gpu(facts):
        return "flash_attention_2 runs on NVIDIA GPUs only"
    if not facts.get("flash_attn_installed"):
        return "flash_attention_2 needs the flash-attn package, which is not installed"
    cc = _cc(facts)
    if cc is not None and cc < FLASH_ATTN2_MIN_CC:
        return f"flash_attention_2 needs compute capability >= {FLASH_ATTN2_MIN_CC}; this GPU is {cc:.1f}"
    return None


# -- torchrun cells (world_size > 1) --------------------------------------------------

SRC_FSDP2 = "torch.distributed.fsdp.fully_shard (FSDP2): parameters become DTensor shards"


def _dist_gpus(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if cell.world_size <= 1 or not _gpu(facts):
        return None
    gpus = facts.get("gpus") or []
    if cell.world_size > len(gpus):
        names = ", ".join(sorted({str(g.get("name")) for g in gpus})) or "none"
        return (f"world_size {cell.world_size} needs {cell.world_size} GPUs (one rank per GPU); this host has "
                f"{len(gpus)} ({names})")
    return None


def _dist_budget(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if cell.world_size > 1 and cell.vram_budget_bytes is not None:
        return "a VRAM budget emulates one smaller GPU: it applies to world_size 1 cells only"
    return None


def _fsdp_quantised(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if cell.parallel != "fsdp" or not _quantised(cell):
        return None
    return (f"{cell.precision} with FSDP is not implemented: fully_shard (FSDP2) turns each parameter into a DTensor "
            "shard, which drops bitsandbytes' Params4bit / Int8Params and their quantisation state; FSDP1 with "
            "bnb_4bit_quant_storage equal to the compute dtype is the known route (not built); use --parallel ddp")


def _fsdp_load(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    if cell.parallel != "fsdp" or cell.quantized or cell.resolved_load() != "pretrained":
        return None
    return ("FSDP cells build the model from its config on the meta device and initialise each rank's shard; "
            "loading a checkpoint (load=pretrained, a local model) into FSDP shards is not implemented")


RULES: tuple[Rule, ...] = (
    Rule("gpu-present", "--device cuda needs an NVIDIA GPU", _gpu_asked),
    Rule("torch-cuda-build", "--device cuda needs a CUDA build of torch", _torch_cpu_build),
    Rule("cuda-driver", "torch's CUDA major version must not exceed the driver's", _cuda_driver, SRC_CUDA_MVC),
    Rule("cuda13-arch", "CUDA 13 builds need compute capability >= 7.5", _cuda13_arch, SRC_CUDA13),
    Rule("transformers-torch", "transformers 5 needs torch >= 2.6", _transformers_torch, SRC_TRANSFORMERS),
    Rule("bf16-cc80", "bf16 needs compute capability >= 8.0", _bf16, SRC_BF16),
    Rule("bnb-installed", "quantised modes and 8-bit optimizers need bitsandbytes", _bnb),
    Rule("bnb-transformers", "transformers 5 needs bitsandbytes >= 0.46.1 for quantised loading",
         _bnb_for_transformers, SRC_TRANSFORMERS),
    Rule("accelerate", "quantised loading needs accelerate >= 1.1.0", _accelerate, SRC_TRANSFORMERS),
    Rule("bnb-torch", "bitsandbytes' torch floor (0.48: 2.3, 0.50: 2.4)", _bnb_torch, SRC_BNB_INSTALL),
    Rule("bnb-cpu", "bitsandbytes on CPU needs >= 0.48.0", _bnb_cpu, SRC_BNB_INSTALL),
    Rule("bnb-cc", "LLM.int8() needs cc >= 7.5, 4-bit and 8-bit optimizers cc >= 6.0", _bnb_cc, SRC_BNB_INSTALL),
    Rule("flash-attn2", "flash_attention_2 needs flash-attn and cc >= 8.0", _flash_attn, SRC_FLASH),
    Rule("stack-gpu", "Liger's and Unsloth's kernels need a CUDA GPU", sr.stack_gpu, sr.SRC_LIGER),
    Rule("stack-installed", "a stack other than hf needs its package", sr.stack_installed),
    Rule("stack-versions", "the stack's declared torch / transformers range", sr.stack_versions),
    Rule("stack-precision", "Unsloth loads 16-bit, int8 and nf4-dq only", sr.stack_precision, sr.SRC_UNSLOTH),
    Rule("stack-offload-length", "Unsloth's offloaded checkpointing needs >= 512 tokens", sr.stack_offload_length,
         sr.SRC_UNSLOTH),
    Rule("stack-single-process", "torchrun cells use the plain stack", sr.stack_single_process),
    Rule("stack-model", "Liger and Unsloth are built here for Llama, Qwen2 and Mistral models", sr.stack_model),
    Rule("stack-attention", "Unsloth's fast path picks its own attention kernel (sdpa only)", sr.stack_attention,
         sr.SRC_UNSLOTH),
    Rule("compile-compiler", "torch.compile (Inductor) needs a C compiler", sr.compile_compiler),
    Rule("dist-gpus", "a cell with world_size N needs N GPUs on a GPU host", _dist_gpus),
    Rule("dist-budget", "VRAM budgets apply to world_size 1 cells", _dist_budget),
    Rule("fsdp-quantised", "FSDP cells are 16/32-bit (bitsandbytes layers are not sharded)", _fsdp_quantised, SRC_FSDP2),
    Rule("fsdp-load", "FSDP cells build from the config (no checkpoint loading)", _fsdp_load, SRC_FSDP2),
)


def verdict(cell: CellSpec, facts: dict[str, Any]) -> Prediction:
    """Every rule's say on ``cell``; unsupported when any rule fires (the first names it)."""
    fired = tuple((r.name, reason) for r in RULES if (reason := r.check(cell, facts)))
    if not fired:
        return Prediction(True)
    return Prediction(False, fired[0][0], fired[0][1], fired)


def predict(cell: CellSpec, facts: dict[str, Any]) -> str | None:
    """The first reason ``cell`` cannot run on a host with ``facts``, or None."""
    return verdict(cell, facts).reason


def rules_table() -> list[dict[str, str]]:
    """The rules as data (name, what, source), for documentation and reports."""
    return [{"rule": r.name, "what": r.doc, "source": r.source} for r in RULES]
