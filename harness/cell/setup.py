"""Setting a cell up (worker side): the synthetic checkpoints written before the cell
measures, the device and what this host supports, the trackers that must start before
CUDA does, the model loaded and wrapped in LoRA, and the proofs that its layers and its
trainable parameters are what the cell asked for.

Mixed precision:

- fp32: no autocast; everything in float32.
- bf16 / fp16: base weights in 16-bit and frozen; LoRA matrices in float32 (peft's
  ``autocast_adapter_dtype``) so the optimizer updates full-precision weights; the
  forward runs under ``torch.autocast`` in the cell's dtype. fp16 adds dynamic loss
  scaling (``torch.amp.GradScaler``): steps whose gradients overflow are skipped and
  counted (``scaler_skipped_steps``).
- int8 / nf4 / fp4 / nf4-dq: bitsandbytes layers, LoRA in float32, autocast in the
  compute dtype (bf16 where supported, else fp16, with loss scaling as for fp16).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from harness.cell.precision import PrecisionProofError, count_layers, load_kwargs, verify_layers
from harness.core.axes import compute_dtype_name, get_mode
from harness.core.spec import CellSpec


class Unsupported(RuntimeError):
    """This host cannot run the cell (the message says why)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the device ------------------------------------------------------------------------

def pick_device(preference: str = "auto"):
    import torch

    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if preference == "cuda":
        raise Unsupported("a CUDA device was asked for but none is available")
    return torch.device("cpu")


def bf16_supported(device) -> bool:
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return True  # CPU kernels exist for bf16 (slow, but real)


def check_support(spec: CellSpec, device) -> None:
    """Raise Unsupported when this host can't run ``spec`` (checked, not assumed)."""
    import torch

    mode = get_mode(spec.precision)
    if mode.weight_dtype == "bfloat16" and not bf16_supported(device):
        cc = torch.cuda.get_device_capability(device)
        raise Unsupported(f"bf16 needs compute capability >= 8.0; this GPU is {cc[0]}.{cc[1]}")
    if mode.quant:
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as F
        except Exception as exc:
            raise Unsupported(f"bitsandbytes cannot be imported: {type(exc).__name__}: {exc}") from exc
        try:  # a real kernel call: an importable package without a backend fails here
            probe = torch.randn(64, 64, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
            F.quantize_4bit(probe)
        except Exception as exc:
            raise Unsupported(
                f"bitsandbytes {getattr(bnb, '__version__', '?')} has no working backend for {device.type}: {exc}"
            ) from exc


def prequantized_int8(spec: CellSpec, opts: dict[str, Any]) -> bool:
    """Whether this cell loads int8 weights from a pre-quantised checkpoint."""
    return bool(opts.get("int8_prequantized")) and spec.precision == "int8" and not spec.model_path \
        and spec.resolved_load() == "pretrained"


def write_checkpoints(spec: CellSpec, opts: dict[str, Any], out: dict[str, Any]) -> None:
    """The synthetic checkpoints a CUDA cell loads, written before it measures: writing
    one builds a bf16 model on the device, which no small budget holds and which, without
    a budget, would inflate the cell's peaks. The int8 one (``--int8-prequantized``) is
    written once too."""
    if opts.get("device", "auto") == "cpu":
        return
    from harness.cell.budget_guard import prepare_checkpoint
    from harness.cell.build import wait_for_writers

    waited = wait_for_writers(opts.get("cache_dir"))
    if waited:  # a checkpoint written ahead of the sweep (gpu-host.sh WRITE_AHEAD) holds the GPU until done
        out["waited_for_checkpoint_writer_s"] = round(waited, 3)
    if prepare_checkpoint(spec, opts):
        out["checkpoint_written_before_cell"] = True
    if prequantized_int8(spec, opts):
        from harness.cell.build import prepare_prequantized_int8

        if prepare_prequantized_int8(spec, opts):
            out["checkpoint_written_before_cell"] = True


def open_sampler(opts: dict[str, Any], nvml_ordinal: int, out: dict[str, Any]):
    """The memory sampler, not started yet. NVML samples the device CUDA_VISIBLE_DEVICES
    pins this process to (NVML ignores that variable); a pinning NVML cannot resolve means
    no VRAM figures, never another GPU's."""
    from harness.cell.trackers.memory import MemorySampler, nvml_index_for_visible_device

    want_cuda = opts.get("device", "auto") != "cpu"
    out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    nvml_index, pin_error = 0, None
    if want_cuda:
        try:
            nvml_index = nvml_index_for_visible_device(nvml_ordinal)
        except Exception as exc:  # noqa: BLE001 - LookupError, or NVML missing
            pin_error = f"{type(exc).__name__}: {exc}"
    mode = opts.get("sampler_mode", "thread")
    sampler = MemorySampler(use_nvml=want_cuda and pin_error is None,
                            period_s=float(opts.get("nvml_period_s", 0.005)), nvml_index=nvml_index, mode=mode)
    if want_cuda and not sampler.nvml_ok:
        sampler = MemorySampler(use_nvml=False, period_s=sampler.period_s, mode=mode)
        sampler.nvml_error = pin_error
    return sampler


def open_device(spec: CellSpec, opts: dict[str, Any], hooks, out: dict[str, Any], trackers):
    """The device, with the trackers that must start around its initialisation: the
    sampler before CUDA (NVML's baseline is this process's zero), and on CUDA the
    allocator's peaks and the VRAM budget's guard before the model is built (the guard
    measures the CUDA context and caps the allocator). Returns (device, sampler, guard)."""
    import torch

    from harness.cell.trackers.memory import AllocatorPeaks

    from harness.cell.trackers import host_load

    host_load.at_start(out)  # before anything of ours loads the host
    sampler = trackers.add(open_sampler(opts, hooks.nvml_ordinal, out))
    device = hooks.device(opts.get("device", "auto"))
    if device.type != "cuda" and sampler.nvml_ok:
        sampler.drop_nvml()
    out["device"] = device.type
    out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out["memory_metric"] = "vram" if device.type == "cuda" else "rss"
    if device.type == "cuda" and sampler.nvml_ok:  # the physical GPU this cell measured
        out["gpu_index"], out["gpu_uuid"] = sampler.nvml_index, sampler.gpu_uuid
    guard = None
    if device.type == "cuda":
        from harness.cell.budget_guard import BudgetGuard

        trackers.add(AllocatorPeaks(device))
        guard = trackers.add(BudgetGuard(spec.vram_budget_bytes, device, sampler.baseline_vram_bytes,
                                         sampler.nvml_index if sampler.nvml_index is not None else 0))
    elif spec.vram_budget_bytes is not None:
        raise Unsupported("a VRAM budget needs a CUDA device; this cell runs on the CPU")
    return device, sampler, guard


# -- the model -------------------------------------------------------------------------

@dataclass
class Prepared:
    """What the training loop needs: the model and the module a step calls, the
    checkpointing evidence, the LoRA parameters, the optimizer and the loss scaler."""

    model: Any
    step_model: Any  # the model, or its DDP / FSDP form (harness.cell.rank)
    preset: dict[str, Any] | None
    evidence: Any  # harness.cell.checkpointing's hooks and counters
    trainable: list[Any]
    frozen_matmul_params: int
    lora_matmul_params: int
    opt: Any
    scaler: Any
    use_scaler: bool
    autocast: Callable[[], Any]
    stack_check: Callable[..., list[str]] | None = None  # the stack's check of the first step's output
    compile: Any = None  # harness.cell.compiled.CompileWatch for --compile cells
    first_output: dict[str, str] | None = None  # the first training step's output, described


def prepare(spec: CellSpec, opts: dict[str, Any], device, out: dict[str, Any], clock, hooks) -> Prepared:
    """Check the host, load the model and wrap it in LoRA with the cell's training stack
    (``harness.cell.stacks``), prove what was built, and compile it for ``--compile``."""
    from harness.cell import attention, stacks
    from harness.core.models import get_preset, skip_modules

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # cosmetic only
        pass
    out["phase"] = "check"
    check_support(spec, device)
    bf16_ok = bf16_supported(device)
    compute = compute_dtype_name(bf16_ok)
    preset = None if spec.model_path else get_preset(spec.model)
    skips = skip_modules(preset)
    out["compute_dtype"] = get_mode(spec.precision).weight_dtype or compute
    if spec.stack != "hf" and device.type != "cuda":
        raise Unsupported(f"the {spec.stack} stack's kernels run on a CUDA GPU only; this cell runs on {device.type}")
    stack = stacks.get(spec.stack)
    build = stacks.Build(spec, opts, device, hooks, preset, skips, bf16_ok, compute, out, log,
                         load_kwargs(spec.precision, bf16_supported=bf16_ok, skip_modules=skips))
    out["stack_versions"] = stacks.versions(spec.stack)

    out["phase"] = "load"
    clock.begin("model_load")
    log(f"loading {spec.model} ({spec.precision}, {spec.resolved_load()}, stack {spec.stack}) on {device}")
    model, info = stack.load(build)
    out.update(info)
    out["attn_implementation_after_load"] = attention.configured(model)

    out["phase"] = "prepare"
    clock.begin("lora_wrap")
    # a checkpoint written (or looked up) inside the load is not the load
    clock.move(info.get("checkpoint_prepare_s") or 0.0, "model_load", "checkpoint_write")
    model, evidence = stack.wrap(build, model)
    counts = count_layers(model, skips, quantized=get_mode(spec.precision).quant is not None)
    out["loaded_layers"] = counts
    problems = verify_layers(spec.precision, counts, compute_dtype=compute)
    if problems:
        raise PrecisionProofError(f"precision proof failed for {spec.precision}: " + "; ".join(problems))
    proof = stack.prove(build, model)
    if proof is not None:
        out["stack_proof"] = proof
    attention.prove(spec, model, out)
    step_model = hooks.wrap(model, evidence)  # DDP / FSDP under torchrun; the model itself otherwise
    watch = None
    if spec.compile:
        from harness.cell.compiled import CompileWatch

        watch = CompileWatch(step_model)
        step_model = watch.compiled
    prepared = _optimizer(spec, model, step_model, preset, evidence, device, compute, out, hooks)
    prepared.stack_check, prepared.compile = stack.check_step, watch
    return prepared


def _optimizer(spec: CellSpec, model, step_model, preset, evidence, device, compute: str,
               out: dict[str, Any], hooks) -> Prepared:
    """The proof that only LoRA trains, the parameter counts, the optimizer, the loss
    scaler and autocast."""
    import torch

    from harness.core.models import vision_tower

    mode = get_mode(spec.precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in n for n in lora_names):
        raise PrecisionProofError(f"trainable parameters other than LoRA: {[n for n in lora_names if 'lora_' not in n][:5]}")
    out["trainable_params"] = int(sum(p.numel() for p in trainable))
    out["total_params"] = int(sum(p.numel() for p in model.parameters()))
    frozen_mm, lora_mm = _matmul_params(model, exclude=vision_tower(preset))
    out["adapter_dtype"] = str(trainable[0].dtype).replace("torch.", "")
    opt = _make_optimizer(spec.optimizer, trainable, spec.lr)
    use_scaler = (mode.weight_dtype == "float16") or (mode.quant is not None and compute == "float16")
    scaler = hooks.grad_scaler(device.type, use_scaler)
    amp_dtype = None if mode.weight_dtype == "float32" else getattr(torch, mode.weight_dtype or compute)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    out["autocast_dtype"] = str(amp_dtype).replace("torch.", "") if amp_dtype is not None else None
    out["loss_scaling"] = bool(use_scaler)
    return Prepared(model=model, step_model=step_model, preset=preset, evidence=evidence, trainable=trainable,
                    frozen_matmul_params=frozen_mm, lora_matmul_params=lora_mm, opt=opt,
                    scaler=scaler, use_scaler=use_scaler, autocast=autocast)


def _make_optimizer(name: str, params, lr: float):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    raise ValueError(name)


def _matmul_params(model, exclude: str | None = None) -> tuple[int, int]:
    """(frozen, lora) matmul parameter counts, from layer shapes (quantised ones too);
    modules under the dotted path ``exclude`` (a VLM's vision tower) are left out."""
    import torch

    frozen = lora = 0
    for name, mod in model.named_modules():
        if exclude and f".{exclude}." in f".{name}.":
            continue
        if isinstance(mod, torch.nn.Linear):
            n = int(mod.in_features) * int(mod.out_features)
            parts = name.split(".")
            if "lora_A" in parts or "lora_B" in parts:
                lora += n
            else:
                frozen += n
    return frozen, lora
