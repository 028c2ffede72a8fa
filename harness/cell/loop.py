"""The training loop of a cell (worker side), and what is checked after it.

A step is a real forward pass of a transformers model with peft LoRA layers, the loss, a
backward pass and an optimizer step on the LoRA parameters (``_Step``). The loop runs the
warm-up steps and then measured steps until the measured window closes (``_Window``: a
fixed count, or the adaptive rule of ``harness.core.window``). ``verify`` then proves that
gradient checkpointing did what the cell asked and computes the cell's FLOPs per token.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass
from typing import Any

from harness.cell.checkpointing import CheckpointProofError
from harness.cell.setup import Prepared, log
from harness.cell.stacks.base import StackProofError, describe_output
from harness.cell.trackers import Trackers, host_load
from harness.cell.trackers.gc_watch import GcWatch
from harness.core import flops as flops_mod
from harness.core.spec import CellSpec
from harness.core.window import window_decision


@dataclass
class Steps:
    """What the loop measured, for ``verify``."""

    times: list[float]  # every step's time, warm-up first
    ran: int  # steps run, warm-up included
    window_rule: str | None
    skipped: int  # steps the loss scaler skipped
    lora_params_with_grad: int | None  # LoRA parameters with a gradient after step 0
    inputs_info: dict[str, Any]


def train(spec: CellSpec, p: Prepared, device, out: dict[str, Any], clock, hooks, *, sampler, guard) -> Steps:
    """Warm-up and measured steps; the losses go into ``out`` as they come."""
    import torch

    from harness.cell import inputs
    from harness.cell.trackers.timing import StepTimer

    clock.begin("data_prep")
    batches = _Batches(spec, p, hooks)
    out.update(batches.info)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timer = StepTimer(sync)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = _Step(p, device, timer, guard)
    window = _Window(spec, timer)
    out["phase"] = "train"
    log(window.describe())
    clock.begin("warmup")
    with Trackers(out) as trackers:
        trackers.add(GcWatch())  # collector pauses during the steps
        i = 0
        while True:
            if i == spec.warmup_steps:
                sampler.energy_start()
                clock.begin("measured")
                if p.compile is not None:
                    p.compile.measured_start()
            batch = inputs.to_device(batches.get(i), device)
            if hooks.before_step(i, sync) is False and i > spec.warmup_steps:
                window.rule = "gate"  # a step gate said stop (benchmarks/interleaved.py)
                break
            loss, dt = step(i, batch)
            hooks.after_step(i, dt)
            out["losses"].append(loss)
            if not math.isfinite(loss) and "nonfinite_diagnosis" not in out and hooks.diagnose_nonfinite:
                _diagnose_nonfinite(p.model, batch, p.autocast, i, loss, out)
            log(f"step {i + 1}/{window.last}{' (warm-up)' if i < spec.warmup_steps else ''}: loss {loss:.4f}, "
                f"{dt * 1000:.1f} ms")
            i += 1
            if window.closed(i):
                break
        sync()
        sampler.energy_stop()
        if p.compile is not None:
            p.compile.window_end()
        host_load.after_window(out, sampler.nvml_index if sampler.nvml_ok else None)
        if getattr(hooks, "profile_busy", True) and device.type == "cuda":
            measured = timer.times[spec.warmup_steps:]
            out.update(host_load.profile_step(lambda: _unmeasured_step(p, batch), device,
                                              statistics.median(measured) if measured else None))
        hooks.after_train(p.model, out)
    return Steps(times=timer.times, ran=i, window_rule=window.rule, skipped=step.skipped,
                 lora_params_with_grad=step.lora_params_with_grad, inputs_info=batches.info)


def _unmeasured_step(p: Prepared, batch: dict[str, Any]) -> None:
    """One more optimizer step outside the measured window and outside the checkpointing
    evidence (its counters are put back: the proof covers the loop's steps only)."""
    ev = p.evidence
    saved = (ev.offloaded_tensors, ev.offloaded_bytes)
    with p.autocast():
        loss = p.step_model(**batch).loss
    p.scaler.scale(loss).backward()
    p.scaler.step(p.opt)
    p.scaler.update()
    p.opt.zero_grad(set_to_none=True)
    ev.offloaded_tensors, ev.offloaded_bytes = saved


class _Batches:
    """The step inputs: those of the warm-up and the minimum measured steps built before
    the loop, more (outside the step timer) when an adaptive window runs past them."""

    def __init__(self, spec: CellSpec, p: Prepared, hooks) -> None:
        from harness.cell import inputs

        self.spec, self.hooks, self.config, self.preset = spec, hooks, p.model.config, p.preset
        # The batch builder follows the model's kind (text, or images + text for a VLM).
        built = inputs.build(hooks.batch_spec(spec), self.config, p.preset, spec.warmup_steps + spec.steps)
        self.batches = list(built.batches)
        self.info = built.info

    def get(self, i: int):
        from harness.cell import inputs

        if i >= len(self.batches):
            n_max = self.spec.warmup_steps + self.spec.max_measured_steps
            more = min(n_max - len(self.batches), max(8, self.spec.steps))
            self.batches.extend(inputs.build(self.hooks.batch_spec(self.spec), self.config, self.preset, more,
                                             start=len(self.batches)).batches)
        return self.batches[i]


class _Step:
    """One optimizer step on one batch, timed between two device synchronisations; the
    VRAM budget's guard re-measures after it, outside the timed region."""

    def __init__(self, p: Prepared, device, timer, guard) -> None:
        self.p, self.device, self.timer, self.guard = p, device, timer, guard
        self.skipped = 0
        self.lora_params_with_grad: int | None = None

    def __call__(self, i: int, batch: dict[str, Any]) -> tuple[float, float]:
        """(the step's loss, its time in seconds)"""
        p = self.p
        self.timer.start()
        p.evidence.enter("forward")
        probe = p.evidence.probe_saved(self.device, p.model) if i == 0 else contextlib.nullcontext()
        module = p.step_model if p.compile is None else p.compile.module(i)
        with probe, p.autocast():
            res = module(**batch)
            loss = res.loss
            if i == 0:  # read, then dropped: holding the output would keep its logits alive
                p.first_output = describe_output(res)
            del res
        if i == 0:
            p.evidence.probe_ctx_held(loss, self.device, p.model)
        p.evidence.enter("backward")
        p.scaler.scale(loss).backward()
        p.evidence.leave()
        if i == 0:
            self.lora_params_with_grad = sum(1 for q in p.trainable if q.grad is not None)
            if p.compile is not None:
                p.evidence.stop()  # compiled steps must not trace the counting hooks
        scale_before = p.scaler.get_scale() if p.use_scaler else None
        p.scaler.step(p.opt)
        p.scaler.update()
        if p.use_scaler and p.scaler.get_scale() < scale_before:
            self.skipped += 1  # the scaler found inf/nan gradients and skipped this step
        p.opt.zero_grad(set_to_none=True)
        dt = self.timer.stop()
        if self.guard is not None:
            self.guard.after_step()
        return float(loss.detach().float().item()), dt


class _Window:
    """When the loop stops: after ``spec.steps`` measured steps, or with ``spec.window``
    by the adaptive rule (``rule`` says which rule closed it)."""

    def __init__(self, spec: CellSpec, timer) -> None:
        self.spec, self.timer = spec, timer
        self.n_warm = spec.warmup_steps
        self.rule: str | None = "fixed" if spec.window is None else None
        # the highest step number the log can name
        self.last = self.n_warm + (spec.steps if spec.window is None else spec.max_measured_steps)

    def describe(self) -> str:
        s, w = self.spec, self.spec.window
        return (f"training: {s.warmup_steps} warm-up + " + (f"{s.steps} measured steps" if w is None else
                f"{s.steps}-{w.max_steps} measured steps (adaptive: stable within {w.stable_rel:.1%} over "
                f"{w.stable_steps} steps, or {w.time_cap_s:g} s)") + f" of {s.tokens_per_step} tokens")

    def closed(self, ran: int) -> bool:
        """Whether the loop stops after ``ran`` steps (warm-up included)."""
        if ran <= self.n_warm:
            return False
        w = self.spec.window
        if w is None:
            return ran >= self.n_warm + self.spec.steps
        self.rule = window_decision(self.timer.times[self.n_warm:], min_steps=self.spec.steps, max_steps=w.max_steps,
                                    time_cap_s=w.time_cap_s, stable_rel=w.stable_rel, stable_steps=w.stable_steps)
        return bool(self.rule)


def _diagnose_nonfinite(model, batch, autocast, step: int, loss: float, out: dict[str, Any]) -> None:
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
    log(diag["message"])


# -- after the loop --------------------------------------------------------------------

def verify(spec: CellSpec, p: Prepared, steps: Steps, out: dict[str, Any], clock) -> None:
    """The measured window into ``out``, the checkpointing proof (raises
    CheckpointProofError), then the FLOPs per token of a cell that passed it."""
    from harness.cell import checkpointing

    clock.begin("verify")
    out["phase"] = "verify"
    n_warm = spec.warmup_steps
    out["step_times_s"] = steps.times[n_warm:]
    out["warmup_step_times_s"] = steps.times[:n_warm]
    out["measured_steps"] = len(out["step_times_s"])
    out["window_rule"] = steps.window_rule
    out["scaler_skipped_steps"] = steps.skipped if p.use_scaler else None
    evidence = p.evidence
    ev = evidence.to_dict(spec.grad_ckpt, steps.ran)
    ev["lora_params_with_grad"] = steps.lora_params_with_grad
    ev["lora_params"] = len(p.trainable)
    # The decoder layers' own flag is what transformers checks; a PeftModel wrapper is
    # in training mode from birth even when the model inside it is still in eval mode.
    ev["model_training_mode"] = all(layer.training for layer in evidence.layers)
    ev["transformers_gc_enabled"] = checkpointing.transformers_flag(p.model)
    if evidence.proof:
        ev["proof"] = evidence.proof
    out["grad_ckpt_evidence"] = ev
    held = checkpointing.ctx_held_warning(spec.grad_ckpt, ev)
    if held:
        out.setdefault("warnings", []).append(held)
    evidence.remove()
    problems = checkpointing.verify(spec.grad_ckpt, ev)
    if steps.lora_params_with_grad != len(p.trainable):
        problems.append(f"only {steps.lora_params_with_grad} of {len(p.trainable)} LoRA parameters received gradients")
    if problems:
        raise CheckpointProofError(f"checkpointing proof failed for gc-{spec.grad_ckpt}: " + "; ".join(problems))
    _stack_checks(spec, p, steps, out)
    out.update(_flops(spec, p, steps))


def _stack_checks(spec: CellSpec, p: Prepared, steps: Steps, out: dict[str, Any]) -> None:
    """The training stack's check of the first step's output, and the compiler's record
    and proof (raise StackProofError)."""
    first = p.first_output or {}
    if "stack_proof" in out:
        out["stack_proof"].update(first)
    problems = p.stack_check(out.get("stack_proof"), first) if p.stack_check else []
    if problems:
        raise StackProofError(f"{spec.stack} proof failed at run time: " + "; ".join(problems))
    if p.compile is not None:
        p.compile.finish(steps.times, out)


def _flops(spec: CellSpec, p: Prepared, steps: Steps) -> dict[str, Any]:
    """FLOPs per training token: the text model's matmuls and attention, plus a VLM's
    vision tower per step spread over the step's tokens."""
    from harness.cell import inputs
    from harness.core.models import vision_tower

    tcfg = inputs.text_config(p.model.config)  # a VLM's language model; the model itself for text models
    n_layers = int(getattr(tcfg, "num_hidden_layers", 0) or len(p.evidence.layers))
    heads = int(getattr(tcfg, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(tcfg, "head_dim", 0) or (tcfg.hidden_size // heads if heads else 0))
    fpt = flops_mod.train_flops_per_token(frozen_params=p.frozen_matmul_params, lora_params=p.lora_matmul_params,
                                          n_layers=n_layers, seq_len=spec.seq_len, attn_dim=heads * head_dim)
    vis = inputs.vision_flops(p.model, vision_tower(p.preset), steps.inputs_info, spec.batch_size, p.evidence.layers)
    fpt += vis["vision_flops_per_step"] / spec.tokens_per_step
    return dict(vis, flops_per_token=fpt, frozen_matmul_params=p.frozen_matmul_params,
                lora_matmul_params=p.lora_matmul_params)
