"""Where a non-finite loss came from (worker side; imports torch when called).

A NaN loss on its own says nothing. When a step's loss is not finite, the workload calls
:func:`diagnose` once, and the record gets a sentence such as

    fp16 overflow: activations became inf at step 3 in model.layers.0.mlp (the input of
    model.layers.0.mlp.down_proj); recomputed in float32 they reach 1.2e+05, beyond
    float16's 65,504

How: (1) the same batch is run forward again, in eval mode and without gradients, with a
hook on every module; the first module (in the order modules finish) whose output holds
inf or NaN is where it showed up. (2) If that module's inputs were already non-finite,
the overflow happened in code between modules (for example Llama's ``act(gate) * up``),
so the scope is its parent. (3) The scope alone is replayed in float32 on its (finite)
inputs to show how large the values really get. Step (3) is skipped, and said so, where
the scope cannot be copied to float32 (quantised layers).

Eval mode matters: transformers skips checkpointing there, so the diagnosis neither
recomputes layers nor offloads anything, and the checkpointing evidence stays exact.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

# Largest finite value per dtype name: what "beyond the range" is measured against.
DTYPE_MAX: dict[str, float] = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38}


# The float32 replay copies the scope where values went bad; above this it is skipped.
REPLAY_MAX_BYTES = 2 * 2**30


class _Stop(Exception):
    """Raised by a hook to end a diagnostic forward pass early."""


def _tensors(obj: Any):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        yield from _tensors(obj.to_tuple())


def _float_tensors(obj: Any):
    return [t for t in _tensors(obj) if t.is_floating_point()]


def _all_finite(obj: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in _float_tensors(obj))


def _finite_abs_max(obj: Any) -> float | None:
    import torch

    best = None
    for t in _float_tensors(obj):
        f = t.detach().float()
        f = f[torch.isfinite(f)]
        if f.numel():
            m = float(f.abs().max())
            best = m if best is None else max(best, m)
    return best


def _first_nonfinite(model, run: Callable[[], Any]) -> dict[str, Any] | None:
    """The first module whose output is not finite, and the innermost module around it
    (itself included) that was entered with finite inputs: where the values went bad."""
    import torch

    found: dict[str, Any] = {}
    stack: list[tuple[str, bool]] = []  # modules entered and not yet finished, outermost first
    handles = []

    def make_pre(name: str):
        def pre(mod, args, kwargs):
            stack.append((name, _all_finite((args, kwargs))))
        return pre

    def make_post(name: str):
        def post(mod, args, kwargs, out):
            if not found and not _all_finite(out):
                outs = _float_tensors(out)
                scope = next((n for n, ok in reversed(stack) if ok), name)
                found.update(
                    module=name,
                    module_type=type(mod).__name__,
                    scope=scope,
                    output_dtype=str(outs[0].dtype).replace("torch.", "") if outs else None,
                    output_has_inf=any(bool(torch.isinf(t).any()) for t in outs),
                    inputs_finite=_all_finite((args, kwargs)),
                    input_abs_max=_finite_abs_max((args, kwargs)),
                    params_finite=all(bool(torch.isfinite(p).all()) for p in mod.parameters(recurse=False)
                                      if p.is_floating_point()),
                )
                raise _Stop
            if stack and stack[-1][0] == name:
                stack.pop()
        return post

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(make_pre(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(make_post(name), with_kwargs=True))
    try:
        run()
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return found or None


def _capture_inputs(model, scope: str, run: Callable[[], Any]):
    """(args, kwargs) the module ``scope`` received in a forward pass, or None."""
    mod = dict(model.named_modules()).get(scope)
    if mod is None:
        return None
    got: list = []

    def pre(m, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    h = mod.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0] if got else None


def _to_fp32(obj: Any):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_fp32(o) for o in obj)
    if isinstance(obj, list):
        return [_to_fp32(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_fp32(v) for k, v in obj.items()}
    return obj


def _replay_fp32(module, inputs, device_type: str) -> float | None:
    """Largest |value| any submodule of a float32 copy of ``module`` sees or makes."""
    import torch

    clone = copy.deepcopy(module).float()
    peak = [0.0]

    def hook(m, args, kwargs, out):
        for obj in (args, kwargs, out):
            v = _finite_abs_max(obj)
            if v is not None:
                peak[0] = max(peak[0], v)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in clone.modules()]
    try:
        args, kwargs = _to_fp32(inputs)
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            clone(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        del clone
    return peak[0] or None


def diagnose(model, batch: dict[str, Any], autocast: Callable[[], Any], *, step: int, loss: float,
             compute_dtype: str | None) -> dict[str, Any]:
    """Find where the non-finite loss of ``step`` came from; returns a dict with ``message``.

    ``batch`` is the step's model inputs (what the batch builder made: input_ids and
    labels, plus pixel values and grids for a vision-language model)."""
    import torch

    was_training = model.training
    device_type = batch["input_ids"].device.type

    def run():
        with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
            return model(**batch)

    diag: dict[str, Any] = {"step": step, "loss": loss, "compute_dtype": compute_dtype}
    model.eval()
    try:
        first = _first_nonfinite(model, run)
        diag["first_nonfinite"] = first
        if first is None:
            diag["kind"] = "loss"
            diag["message"] = (f"loss became {loss} at step {step}, although every module output was finite "
                               "(the loss computation itself overflowed)")
            return diag
        scope = first["scope"]
        diag["scope"] = scope
        dtype = first["output_dtype"] or compute_dtype or "?"
        overflow = first["output_has_inf"] or (dtype == "float16" and first["params_finite"])
        diag["kind"] = "overflow" if overflow and first["params_finite"] else "nan"
        try:
            scope_mod = dict(model.named_modules())[scope]
            fp32_bytes = 4 * sum(p.numel() for p in scope_mod.parameters())
            if fp32_bytes > REPLAY_MAX_BYTES:  # a float32 copy of a whole model could itself run out of memory
                raise MemoryError(f"a float32 copy of {_short(scope)} needs {fp32_bytes / 2**30:.1f} GiB")
            inputs = _capture_inputs(model, scope, run)
            diag["fp32_peak_abs"] = _replay_fp32(scope_mod, inputs, device_type) if inputs else None
        except Exception as exc:  # quantised layers cannot be copied to fp32: say so, don't fail
            diag["fp32_peak_abs"] = None
            diag["fp32_replay_error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        model.train(was_training)
    diag["message"] = _sentence(diag, dtype)
    return diag


def _short(name: str) -> str:
    """Module names without peft's wrapper prefix (``base_model.model.``)."""
    return name.removeprefix("base_model.model.")


def _sentence(d: dict[str, Any], dtype: str) -> str:
    first, step, scope = d["first_nonfinite"], d["step"], d["scope"]
    where = _short(scope) if scope == first["module"] else \
        f"{_short(scope)} (first non-finite output: {_short(first['module'])})"
    peak = d.get("fp32_peak_abs")
    limit = DTYPE_MAX.get(dtype)
    if d["kind"] == "overflow":
        label = "fp16 overflow" if dtype == "float16" else f"{dtype} overflow"
        text = f"{label}: activations became inf at step {step} in {where}"
        if peak is not None:
            text += f"; recomputed in float32 they reach {peak:.3g}"
            if limit is not None and peak > limit:
                text += f", beyond {dtype}'s {limit:,.0f}" if limit < 1e6 else f", beyond {dtype}'s range"
        return text
    cause = "its own weights are not finite: a diverged update" if not first["params_finite"] else f"{dtype} output"
    return f"NaN at step {step}: first produced in {where} ({cause})"
