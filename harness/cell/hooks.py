"""``CellHooks``: the extension point of a cell (worker side).

The points where a cell's process may work differently from a one-process cell: one rank
of a torchrun cell (``harness.cell.rank.DistHooks``: its device, an FSDP model built on the
meta device, DDP / FSDP wrapping, a sharded loss scaler, per-rank batches, a barrier
before each step, a checksum of the adapter after training), or a gate around the steps.
The defaults are what a one-process cell does.
"""

from __future__ import annotations

from typing import Any

from harness.cell.setup import log, pick_device, prequantized_int8
from harness.core.spec import CellSpec


class CellHooks:
    nvml_ordinal = 0  # the CUDA device (ordinal as this process sees it) NVML samples
    diagnose_nonfinite = True  # the diagnosis reruns the model: not under FSDP (collectives)
    profile_busy = True  # one extra profiled step after the window (torchrun ranks skip it: collectives)

    def device(self, preference: str):
        return pick_device(preference)

    def load(self, spec: CellSpec, load_kwargs: dict[str, Any], device, opts: dict[str, Any]):
        from harness.cell.build import load_model

        return load_model(spec, load_kwargs=load_kwargs, device=str(device), cache_dir=opts.get("cache_dir"), log=log,
                          prequantized_int8=prequantized_int8(spec, opts))

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
        step (after at least one measured step): a step gate's stop."""

    def after_step(self, step: int, step_time: float) -> None:
        """Right after a step's timer stopped, with the step's time."""

    def after_train(self, model, out: dict[str, Any]) -> None:
        """After the last step, before the proofs."""
