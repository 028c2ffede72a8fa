"""The LoRA training loop for one cell (worker side).

A step is a real forward pass of a transformers model with peft LoRA layers, the loss,
a backward pass and an optimizer step on the LoRA parameters. Mixed precision:

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

import math
import os
import time
import traceback
from typing import Any

from harness.core import flops as flops_mod
from harness.core import phases as perf
from harness.cell.checkpointing import CheckpointProofError
from harness.cell.precision import PrecisionProofError, count_layers, load_kwargs, verify_layers
from harness.core.axes import compute_dtype_name, get_mode
from harness.core.record import Status, is_oom_message
from harness.core.spec import CellSpec
from harness.cell.build import CheckpointTooLarge
from harness.cell.budget_guard import BudgetUnusable


class Unsupported(RuntimeError):
    """This host cannot run the cell (the message says why)."""


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def _lora_target(spec: CellSpec):
    t = spec.lora.target_modules
    return t if t == "all-linear" else [s.strip() for s in t.split(",") if s.strip()]


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


class _Partial(dict):
    """What the cell has measured so far, kept so an OOM or error loses nothing."""


class CellHooks:
    """issue 8: the points where one rank of a torchrun cell (``harness.cell.rank``) differs
    from a one-process cell. These defaults are what a one-process cell does."""

    nvml_ordinal = 0  # the CUDA device (ordinal as this process sees it) NVML samples
    diagnose_nonfinite = True  # the diagnosis reruns the model: not under FSDP (collectives)

    def device(self, preference: str):
        return pick_device(preference)

    def load(self, spec: CellSpec, load_kwargs: dict[str, Any], device, opts: dict[str, Any]):
        from harness.cell.build import load_model

        return load_model(spec, load_kwargs=load_kwargs, device=str(device), cache_dir=opts.get("cache_dir"), log=_log,
                          prequantized_int8=_prequantize_int8(spec, opts))

    def wrap(self, model, evidence):
        """The module a step calls (DDP wraps the LoRA model; FSDP shards it in place)."""
        return model

    def grad_scaler(self, device_type: str, enabled: bool):
        """fp16 loss scaling (FSDP needs a scaler that agrees on skipped steps across shards)."""
        import torch

        return torch.amp.GradScaler(device_type, enabled=enabled)

    def batch_spec(self, spec: CellSpec) -> CellSpec:
        """The spec the step batches are drawn from (a rank's seed differs)."""
        return spec

    def before_step(self, step: int, sync) -> bool | None:
        """Right before a step's timer starts. False ends the measured window before this
        step (after at least one measured step): the step gate's stop."""

    def after_step(self, step: int, step_time: float) -> None:
        """Right after a step's timer stopped, with the step's time."""

    def after_train(self, model, out: dict[str, Any]) -> None:
        """After the last step, before the proofs."""


def run_cell(spec_dict: dict[str, Any], opts: dict[str, Any] | None = None,
             hooks: CellHooks | None = None) -> dict[str, Any]:
    """Run one cell in this process; returns the worker half of the result record."""
    # issue 7: the cell's timeline in phases (harness.core.phases; docs/results-schema.md)
    clock = perf.PhaseClock("imports")
    opts = opts or {}
    hooks = hooks or CellHooks()
    spec = CellSpec.from_dict(spec_dict)
    out = _Partial(status=Status.ERROR.value, error=None, losses=[], step_times_s=[], loaded_layers=None,
                   grad_ckpt_evidence=None, _t_cell_start=clock.start)
    sampler = None
    device = None
    guard = None  # issue 5: VRAM budget emulation (harness.cell.budget_guard)
    try:
        import torch
        from harness.cell.trackers.memory import MemorySampler, nvml_index_for_visible_device

        clock.begin("checkpoint_write")
        if opts.get("device", "auto") != "cpu":
            # issue 5: no cell pays for writing the synthetic checkpoint (a bf16 model on the
            # device): under a budget it would not fit, without one it inflates the peaks
            from harness.cell.budget_guard import prepare_checkpoint

            if prepare_checkpoint(spec, opts):
                out["checkpoint_written_before_cell"] = True
            if _prequantize_int8(spec, opts):  # issue 7: the int8 checkpoint, written once
                from harness.cell.build import prepare_prequantized_int8

                if prepare_prequantized_int8(spec, opts):
                    out["checkpoint_written_before_cell"] = True
        clock.begin("device_init")
        # NVML's baseline is read before this process initialises CUDA.
        want_cuda = opts.get("device", "auto") != "cpu"
        # issue 8: the NVML device is the one CUDA_VISIBLE_DEVICES pins this process to
        # (NVML ignores that variable); a pinning NVML cannot resolve means no VRAM figures,
        # never another GPU's
        out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        nvml_index, pin_error = 0, None
        if want_cuda:
            try:
                nvml_index = nvml_index_for_visible_device(hooks.nvml_ordinal)
            except Exception as exc:  # noqa: BLE001 - LookupError, or NVML missing
                pin_error = f"{type(exc).__name__}: {exc}"
        mode = opts.get("sampler_mode", "thread")  # issue 7: thread or process
        sampler = MemorySampler(use_nvml=want_cuda and pin_error is None,
                                period_s=float(opts.get("nvml_period_s", 0.005)), nvml_index=nvml_index, mode=mode)
        if want_cuda and not sampler.nvml_ok:
            sampler = MemorySampler(use_nvml=False, period_s=sampler.period_s, mode=mode)
            sampler.nvml_error = pin_error
        sampler.start()
        device = hooks.device(opts.get("device", "auto"))
        if device.type != "cuda" and sampler.nvml_ok:
            sampler.stop()
            sampler = MemorySampler(use_nvml=False, period_s=sampler.period_s, mode=mode).start()
        out["device"] = device.type
        out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        out["memory_metric"] = "vram" if device.type == "cuda" else "rss"
        if device.type == "cuda" and sampler.nvml_ok:  # issue 8: the physical GPU this cell measured
            out["gpu_index"], out["gpu_uuid"] = sampler.nvml_index, sampler.gpu_uuid
        if device.type == "cuda":  # before the model is built: measure the context, cap the allocator
            from harness.cell.budget_guard import BudgetGuard

            guard = BudgetGuard(spec.vram_budget_bytes, device, sampler.baseline_vram_bytes,
                                sampler.nvml_index if sampler.nvml_index is not None else 0)
            guard.start()
        elif spec.vram_budget_bytes is not None:
            raise Unsupported("a VRAM budget needs a CUDA device; this cell runs on the CPU")
        if opts.get("step_gate"):  # benchmarks/interleaved.py: the cell steps in turn with other processes
            from harness.cell.trackers.gate import GatedHooks

            hooks = GatedHooks(hooks, opts["step_gate"], sampler)
        _run(spec, opts, device, sampler, out, guard, clock, hooks)
        out["status"] = Status.OK.value
    except (Unsupported, BudgetUnusable, CheckpointTooLarge) as exc:
        out["status"] = Status.UNSUPPORTED.value
        out["error"] = str(exc)
    except (PrecisionProofError, CheckpointProofError) as exc:
        out["status"] = Status.ERROR.value
        out["error"] = str(exc)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a record
        text = f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "OutOfMemoryError" or is_oom_message(text):
            out["status"] = Status.OOM.value
            out["error"] = text.splitlines()[0][:500]
            out["oom_phase"] = out.get("phase")
        else:
            out["status"] = Status.ERROR.value
            out["error"] = text[:2000]
            out["traceback"] = traceback.format_exc()[-4000:]
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
    finally:
        # issue 7: the cell's work ends here; what follows (and the process's exit) is the
        # teardown, measured by the parent up to the moment it sees the process end
        out["_t_body_end"] = clock.begin(None)
        out.update(clock.fields())
        if sampler is not None:
            sampler.energy_stop()
            sampler.stop()
            out.update(sampler.results())
        if device is not None and device.type == "cuda":
            from harness.cell.trackers.memory import torch_memory_stats

            try:
                out.update(torch_memory_stats(device))
            except Exception:
                pass
        if guard is not None:
            guard.finish(out)
        _finish(spec, out)
    return dict(out)



def _prequantize_int8(spec: CellSpec, opts: dict[str, Any]) -> bool:
    """issue 7: whether this cell loads int8 weights from a pre-quantised checkpoint."""
    return bool(opts.get("int8_prequantized")) and spec.precision == "int8" and not spec.model_path \
        and spec.resolved_load() == "pretrained"


def _run(spec: CellSpec, opts: dict[str, Any], device, sampler, out: _Partial, guard=None, clock=None,
         hooks: CellHooks | None = None) -> None:
    hooks = hooks or CellHooks()
    import contextlib

    import numpy as np
    import peft
    import torch

    from harness.cell import checkpointing
    from harness.cell import inputs
    from harness.core.models import get_preset, lora_exclude, skip_modules, vision_tower
    from harness.cell.trackers.timing import StepTimer

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # cosmetic only
        pass
    clock = clock or perf.PhaseClock("device_init")
    out["phase"] = "check"
    check_support(spec, device)
    mode = get_mode(spec.precision)
    bf16_ok = bf16_supported(device)
    compute = compute_dtype_name(bf16_ok)
    preset = None if spec.model_path else get_preset(spec.model)
    skips = skip_modules(preset)
    out["compute_dtype"] = mode.weight_dtype or compute

    out["phase"] = "load"
    clock.begin("model_load")
    _log(f"loading {spec.model} ({spec.precision}, {spec.resolved_load()}) on {device}")
    kw = load_kwargs(spec.precision, bf16_supported=bf16_ok, skip_modules=skips)
    model, info = hooks.load(spec, kw, device, opts)
    out.update(info)

    out["phase"] = "prepare"
    clock.begin("lora_wrap")
    # a checkpoint written (or looked up) inside the load is not the load
    clock.move(info.get("checkpoint_prepare_s") or 0.0, "model_load", "checkpoint_write")
    evidence = checkpointing.apply(model, spec.grad_ckpt)
    lcfg = peft.LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                           target_modules=_lora_target(spec), bias="none", task_type="CAUSAL_LM",
                           exclude_modules=lora_exclude(preset, spec.lora.include_vision))
    # LoRA's A matrices are drawn from the global RNG: seed it here so every precision and
    # load path of a cell starts from the same adapter (the stability suite compares them).
    torch.manual_seed(spec.seed)
    model = peft.get_peft_model(model, lcfg)
    if not spec.lora.input_cast:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    out["lora_input_cast"] = spec.lora.input_cast
    # from_pretrained gave us an eval-mode model; transformers skips checkpointing in
    # eval mode. The evidence check below catches a loop that forgets this.
    if not opts.get("_test_forget_train_mode"):
        model.train()
    counts = count_layers(model, skips, quantized=mode.quant is not None)
    out["loaded_layers"] = counts
    problems = verify_layers(spec.precision, counts, compute_dtype=compute)
    if problems:
        raise PrecisionProofError(f"precision proof failed for {spec.precision}: " + "; ".join(problems))
    step_model = hooks.wrap(model, evidence)  # issue 8: DDP / FSDP; the model itself otherwise

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

    cfg = model.config
    clock.begin("data_prep")
    n_warm = spec.warmup_steps
    n_total = n_warm + spec.steps  # the least a cell runs; an adaptive window may run more
    n_max = n_warm + spec.max_measured_steps
    # The batch builder follows the model's kind (text, or images + text for a VLM).
    step_inputs = inputs.build(hooks.batch_spec(spec), cfg, preset, n_total)
    batches = list(step_inputs.batches)
    out.update(step_inputs.info)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timer = StepTimer(sync)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    skipped = 0
    lora_params_with_grad = None
    out["phase"] = "train"
    w = spec.window
    window_rule = "fixed" if w is None else None
    _log(f"training: {spec.warmup_steps} warm-up + " + (f"{spec.steps} measured steps" if w is None else
         f"{spec.steps}-{w.max_steps} measured steps (adaptive: stable within {w.stable_rel:.1%} over "
         f"{w.stable_steps} steps, or {w.time_cap_s:g} s)") + f" of {spec.tokens_per_step} tokens")
    clock.begin("warmup")
    gc_watch = _GcWatch().start()  # issue 7: collector pauses during the steps, for the record
    i = 0
    while True:
        if i == n_warm:
            sampler.energy_start()
            clock.begin("measured")
        if i >= len(batches):  # an adaptive window ran past the batches built: more, outside the timer
            more = min(n_max - len(batches), max(8, spec.steps))
            batches.extend(inputs.build(hooks.batch_spec(spec), cfg, preset, more, start=len(batches)).batches)
        batch = inputs.to_device(batches[i], device)
        if hooks.before_step(i, sync) is False and i > n_warm:
            window_rule = "gate"
            break
        timer.start()
        evidence.enter("forward")
        probe = evidence.probe_saved(device, model) if i == 0 else contextlib.nullcontext()
        with probe, autocast():
            loss = step_model(**batch).loss
        if i == 0:
            evidence.probe_ctx_held(loss, device, model)
        evidence.enter("backward")
        scaler.scale(loss).backward()
        evidence.leave()
        if i == 0:
            lora_params_with_grad = sum(1 for p in trainable if p.grad is not None)
        scale_before = scaler.get_scale() if use_scaler else None
        scaler.step(opt)
        scaler.update()
        if use_scaler and scaler.get_scale() < scale_before:
            skipped += 1  # the scaler found inf/nan gradients and skipped this step
        opt.zero_grad(set_to_none=True)
        dt = timer.stop()
        hooks.after_step(i, dt)
        if guard is not None:  # outside the timed region
            guard.after_step()
        lv = float(loss.detach().float().item())
        out["losses"].append(lv)
        if not math.isfinite(lv) and "nonfinite_diagnosis" not in out and hooks.diagnose_nonfinite:
            _diagnose_nonfinite(model, batch, autocast, i, lv, out)
        _log(f"step {i + 1}/{n_total if w is None else n_max}{' (warm-up)' if i < n_warm else ''}: loss {lv:.4f}, "
             f"{dt * 1000:.1f} ms")
        i += 1
        if i <= n_warm:
            continue
        if w is None:
            if i >= n_total:
                break
        else:
            window_rule = perf.window_decision(timer.times[n_warm:], min_steps=spec.steps, max_steps=w.max_steps,
                                               time_cap_s=w.time_cap_s, stable_rel=w.stable_rel,
                                               stable_steps=w.stable_steps)
            if window_rule:
                break
    n_total = i
    sync()
    sampler.energy_stop()
    hooks.after_train(model, out)
    out["gc_pauses"] = gc_watch.stop()
    clock.begin("verify")
    out["phase"] = "verify"
    out["step_times_s"] = timer.times[n_warm:]
    out["warmup_step_times_s"] = timer.times[:n_warm]
    out["measured_steps"] = len(out["step_times_s"])
    out["window_rule"] = window_rule
    out["scaler_skipped_steps"] = skipped if use_scaler else None
    ev = evidence.to_dict(spec.grad_ckpt, n_total)
    ev["lora_params_with_grad"] = lora_params_with_grad
    ev["lora_params"] = len(trainable)
    # The decoder layers' own flag is what transformers checks; a PeftModel wrapper is
    # in training mode from birth even when the model inside it is still in eval mode.
    ev["model_training_mode"] = all(layer.training for layer in evidence.layers)
    ev["transformers_gc_enabled"] = checkpointing.transformers_flag(model)
    out["grad_ckpt_evidence"] = ev
    held = checkpointing.ctx_held_warning(spec.grad_ckpt, ev)
    if held:
        out.setdefault("warnings", []).append(held)
    evidence.remove()
    problems = checkpointing.verify(spec.grad_ckpt, ev)
    if lora_params_with_grad != len(trainable):
        problems.append(f"only {lora_params_with_grad} of {len(trainable)} LoRA parameters received gradients")
    if problems:
        raise CheckpointProofError(f"checkpointing proof failed for gc-{spec.grad_ckpt}: " + "; ".join(problems))
    # Performance figures, only for a cell that completed.
    tcfg = inputs.text_config(cfg)  # a VLM's language model; the model itself for text models
    n_layers = int(getattr(tcfg, "num_hidden_layers", 0) or len(evidence.layers))
    heads = int(getattr(tcfg, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(tcfg, "head_dim", 0) or (tcfg.hidden_size // heads if heads else 0))
    fpt = flops_mod.train_flops_per_token(frozen_params=frozen_mm, lora_params=lora_mm, n_layers=n_layers,
                                          seq_len=spec.seq_len, attn_dim=heads * head_dim)
    vis = inputs.vision_flops(model, vision_tower(preset), step_inputs.info, spec.batch_size, evidence.layers)
    out.update(vis)
    fpt += vis["vision_flops_per_step"] / spec.tokens_per_step
    out["flops_per_token"] = fpt
    out["frozen_matmul_params"] = frozen_mm
    out["lora_matmul_params"] = lora_mm
    out["_energy"] = sampler.energy_j
    del np


class _GcWatch:
    """Python's garbage collections during the training loop (issue 7): how many per
    generation and how long they took in all. A full (generation 2) collection walks
    every tracked object; the worker freezes the libraries' objects first
    (``harness.cell.server``), so what remains is the cell's own."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            g = int(info.get("generation", 0))
            self.counts[g] += 1
            self.seconds[g] += time.perf_counter() - self._t0

    def start(self) -> "_GcWatch":
        import gc

        gc.callbacks.append(self._cb)
        return self

    def stop(self) -> dict[str, Any]:
        import gc

        if self._cb in gc.callbacks:
            gc.callbacks.remove(self._cb)
        return {"collections": list(self.counts), "seconds": [round(s, 6) for s in self.seconds]}


def _diagnose_nonfinite(model, batch, autocast, step: int, loss: float, out: _Partial) -> None:
    """Say where the first non-finite loss came from (fp16 overflow or NaN), once a cell.
    Runs outside the step timer (its memory and energy do count in the cell's totals: such
    a cell's measurements are not the point); a failure here is recorded, never fatal."""
    from harness.cell import numerics

    try:
        diag = numerics.diagnose(model, batch, autocast, step=step, loss=loss, compute_dtype=out.get("autocast_dtype"))
    except Exception as exc:  # noqa: BLE001 - the diagnosis must not end the cell
        diag = {"step": step, "loss": loss, "message": f"loss became {loss} at step {step} (diagnosis failed: "
                                                        f"{type(exc).__name__}: {exc})"[:500]}
    out["nonfinite_diagnosis"] = diag
    out["nonfinite_message"] = diag["message"]
    _log(diag["message"])


def _finish(spec: CellSpec, out: _Partial) -> None:
    """Derived figures from whatever was measured (also for OOM / error records)."""
    from harness.cell.trackers.timing import summarize

    out.update(summarize(out.get("step_times_s") or [], spec.tokens_per_step))
    energy = out.pop("_energy", None)
    measured_tokens = spec.tokens_per_step * len(out.get("step_times_s") or [])
    out["energy_j"] = energy
    out["energy_per_token_j"] = (energy / measured_tokens) if (energy is not None and measured_tokens) else None
    peak = flops_mod.peak_flops(out.get("device_name"), out.get("autocast_dtype") or "float32")
    out["peak_flops"] = peak
    out["mfu"] = flops_mod.mfu(out.get("tokens_per_s"), out.get("flops_per_token"), peak) if out.get("status") == Status.OK.value else None
    losses = out.get("losses") or []
    out["nonfinite_losses"] = sum(1 for v in losses if not math.isfinite(v))
    if out.get("status") == Status.OK.value:
        out.pop("phase", None)
    out["worker_pid"] = os.getpid()
