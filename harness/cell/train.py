"""One cell in this process (worker side): ``run_cell``, the job target of every cell.

The cell's work, in order: the synthetic checkpoints written before it measures, the
device (``harness.cell.setup``), the model loaded, wrapped in LoRA and proven, the
training loop and the checkpointing proof (``harness.cell.loop``). The trackers (phase
clock, memory sampler, the allocator's peaks, the VRAM budget's guard; the loop adds the
GC watch) are context managers stacked around that work (``harness.cell.trackers``): they
stop however it ends, and each writes its figures into the result, so an out-of-memory
or failed cell keeps everything measured until then. How the work ended becomes the
record's status (``run_cell``'s ``except`` clauses).
"""

from __future__ import annotations

import math
import os
import traceback
from typing import Any

from harness.cell import loop, setup
from harness.cell.budget_guard import BudgetUnusable
from harness.cell.build import CheckpointTooLarge
from harness.cell.checkpointing import CheckpointProofError
from harness.cell.hooks import CellHooks
from harness.cell.precision import PrecisionProofError
from harness.cell.setup import Unsupported
from harness.cell.stacks.base import StackProofError, StackUnavailable, cell_environment, import_stack
from harness.cell.trackers import Trackers
from harness.core import flops as flops_mod
from harness.core.phases import PhaseClock
from harness.core.record import Status, is_oom_message
from harness.core.spec import CellSpec

__all__ = ["CellHooks", "Unsupported", "run_cell"]


class _Partial(dict):
    """The cell's result as it is measured: kept whole however the cell ends, so an
    OOM or an error loses nothing measured before it."""

    energy_j: float | None = None  # the measured steps' energy, once the cell completed


def run_cell(spec_dict: dict[str, Any], opts: dict[str, Any] | None = None,
             hooks: CellHooks | None = None) -> dict[str, Any]:
    """Run one cell in this process; returns the worker half of the result record."""
    clock = PhaseClock("imports")  # the cell's timeline in phases (harness.core.phases)
    opts = opts or {}
    hooks = hooks or CellHooks()
    spec = CellSpec.from_dict(spec_dict)
    out = _Partial(status=Status.ERROR.value, error=None, losses=[], step_times_s=[], loaded_layers=None,
                   grad_ckpt_evidence=None)
    try:
        with Trackers(out, clock) as trackers:
            _work(spec, opts, hooks, out, clock, trackers)
            out["status"] = Status.OK.value
    except (Unsupported, BudgetUnusable, CheckpointTooLarge, StackUnavailable) as exc:
        out["status"] = Status.UNSUPPORTED.value
        out["error"] = str(exc)
    except (PrecisionProofError, CheckpointProofError, StackProofError) as exc:
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
        _finish(spec, out)
    return dict(out)


def _work(spec: CellSpec, opts: dict[str, Any], hooks: CellHooks, out: _Partial, clock: PhaseClock,
          trackers: Trackers) -> None:
    """The cell's work, phase by phase; raises however it fails."""
    cell_environment(out)  # before CUDA starts and before any stack's import
    import_stack(spec, opts)  # Unsloth first, before the model code it patches runs
    import torch  # noqa: F401 - a broken install fails here, as the cell's error

    clock.begin("checkpoint_write")
    setup.write_checkpoints(spec, opts, out)
    clock.begin("device_init")
    device, sampler, guard = setup.open_device(spec, opts, hooks, out, trackers)
    if opts.get("step_gate"):  # benchmarks/interleaved.py: the cell steps in turn with other processes
        from harness.cell.trackers.gate import GatedHooks

        hooks = GatedHooks(hooks, opts["step_gate"], sampler)
    prepared = setup.prepare(spec, opts, device, out, clock, hooks)
    steps = loop.train(spec, prepared, device, out, clock, hooks, sampler=sampler, guard=guard)
    loop.verify(spec, prepared, steps, out, clock)
    out.energy_j = sampler.energy_j


def _finish(spec: CellSpec, out: _Partial) -> None:
    """Derived figures from whatever was measured (also for OOM / error records)."""
    from harness.core.steps import summarize

    out.update(summarize(out.get("step_times_s") or [], spec.tokens_per_step))
    energy = out.energy_j
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
