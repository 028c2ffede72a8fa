"""Loading by the seed's flags, end to end, and the checks that what loaded is what was
asked (worker side: imports torch, transformers, peft and bitsandbytes when called).

``load_by_flags`` is the seed's loader call made honest: the flags (``load_in_4bit``,
``load_in_8bit``, ``dtype``, ``bnb_4bit_*``) go through ``precision.resolve_flags`` (one
mode, or a clear error), every quantisation parameter is then set explicitly, the model
is loaded with ``from_pretrained``, LoRA is attached, and the layers are counted and
proven (``precision.verify_layers``). A loader that quietly loads something else, the
seed's "framework silently picks QLoRA", raises ``PrecisionProofError``.

``run_checks`` runs the loading-correctness cases on this host's device and returns one
result per case; the compatibility suite runs it in a worker on the GPU host, the tests
run the same cases on CPU.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from harness.cell.precision import PrecisionProofError, count_layers, load_kwargs, resolve_flags, verify_layers
from harness.core.axes import get_mode
from harness.core.errors import SpecError


@dataclass(frozen=True)
class FlagRequest:
    """The loader flags a user writes (the seed's vocabulary)."""

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    dtype: str | None = None
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: str | None = None  # None: bf16 where supported, else fp16


@dataclass(frozen=True)
class Loaded:
    model: Any
    mode: str
    compute_dtype: str
    counts: dict[str, Any]


def _kwargs_for(req: FlagRequest, mode: str, bf16_supported: bool) -> tuple[dict[str, Any], str]:
    import torch

    kw = load_kwargs(mode, bf16_supported=bf16_supported)
    compute = str(kw["dtype"]).replace("torch.", "")
    if req.bnb_4bit_compute_dtype and get_mode(mode).quant == "4bit":
        compute = str(req.bnb_4bit_compute_dtype).replace("torch.", "")
        qc = kw["quantization_config"]
        qc.bnb_4bit_compute_dtype = getattr(torch, compute)
        kw["dtype"] = getattr(torch, compute)
    return kw, compute


def _default_loader(path: str, *, device: str, **kwargs):
    from harness.cell.build import load_pretrained

    return load_pretrained(path, load_kwargs=kwargs, device=device, attn_implementation="sdpa")


def load_by_flags(path: str, req: FlagRequest, *, device: str = "cpu", bf16_supported: bool = True,
                  loader: Callable[..., Any] | None = None, lora_rank: int = 4) -> Loaded:
    """Resolve the flags, load with every quantisation parameter explicit, attach LoRA,
    and prove the layers. ``loader(path, device=..., **kwargs)`` stands for whatever loads
    the model (a wrapper library, say); the proof does not trust it."""
    import peft

    mode = resolve_flags(load_in_4bit=req.load_in_4bit, load_in_8bit=req.load_in_8bit, dtype=req.dtype,
                         bnb_4bit_quant_type=req.bnb_4bit_quant_type,
                         bnb_4bit_use_double_quant=req.bnb_4bit_use_double_quant, bf16_supported=bf16_supported)
    kwargs, compute = _kwargs_for(req, mode, bf16_supported)
    model = (loader or _default_loader)(str(path), device=device, **kwargs)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, target_modules="all-linear"))
    quantised = get_mode(mode).quant is not None
    counts = count_layers(model, quantized=quantised)
    problems = verify_layers(mode, counts, compute_dtype=compute)
    if problems:
        raise PrecisionProofError(f"asked for {mode} ({_flags_text(req)}), loaded otherwise: " + "; ".join(problems))
    return Loaded(model, mode, compute, counts)


def _flags_text(req: FlagRequest) -> str:
    """The flags as written: the two quantisation switches always, others when set."""
    default = FlagRequest()
    return ", ".join(f"{f.name}={getattr(req, f.name)!r}" for f in dataclasses.fields(req)
                     if f.name in ("load_in_4bit", "load_in_8bit") or getattr(req, f.name) != getattr(default, f.name))


def prequantised_copy(path: str, out_dir: str, *, device: str, bf16_supported: bool) -> str:
    """Save a 4-bit copy of the checkpoint: its config.json then carries a
    quantization_config, like the pre-quantised "-bnb-4bit" checkpoints people download."""
    m = _default_loader(path, device=device, **load_kwargs("nf4", bf16_supported=bf16_supported))
    m.save_pretrained(out_dir)
    del m
    return out_dir


def _overriding_wrapper(path: str, *, device: str, **kwargs):
    """A loader in the style of a wrapper library that defaults to 4-bit: it replaces the
    caller's quantisation settings with its own."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    return _default_loader(path, device=device, **kwargs)


def _case(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
        out = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:500]}
    out["case"] = name
    out["time_s"] = time.perf_counter() - t0
    _release_memory()
    return out


def _release_memory() -> None:
    """Give the models of a case back before the next one loads (one GPU, several loads)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def check_cases(path: str, *, device: str, bf16_supported: bool, work_dir: str) -> list[dict[str, Any]]:
    """The loading-correctness cases on one checkpoint; each says ok and why."""
    dtype16 = "bfloat16" if bf16_supported else "float16"

    def no_flags():
        got = load_by_flags(path, FlagRequest(load_in_4bit=False), device=device, bf16_supported=bf16_supported)
        c = got.counts
        ok = got.mode in ("bf16", "fp16") and c["linear4bit"]["count"] == 0 and c["linear8bit"]["count"] == 0 \
            and set(c["linear"]["dtypes"]) == {dtype16}
        return {"ok": ok, "detail": f"mode {got.mode}: {c['linear4bit']['count']} 4-bit, {c['linear8bit']['count']} "
                                    f"8-bit, linear {c['linear']['dtypes']}"}

    def conflict():
        ours = theirs = None
        try:
            resolve_flags(load_in_4bit=True, load_in_8bit=True)
        except SpecError as exc:
            ours = str(exc)
        try:
            from transformers import BitsAndBytesConfig

            BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)
        except ValueError as exc:
            theirs = str(exc)
        return {"ok": bool(ours and theirs), "detail": f"harness: {ours}; transformers: {theirs}"}

    def double_quant():
        got = load_by_flags(path, FlagRequest(load_in_4bit=True, bnb_4bit_use_double_quant=True), device=device,
                            bf16_supported=bf16_supported)
        l4 = got.counts["linear4bit"]
        nested = _nested_states(got.model)
        ok = got.mode == "nf4-dq" and l4["count"] > 0 and l4["double_quant"] == l4["count"] == nested
        return {"ok": ok, "detail": f"{l4['double_quant']} of {l4['count']} 4-bit layers double-quantised "
                                    f"({nested} quant states with a nested state2)"}

    def compute_dtype():
        rows = []
        for asked in ("float16", dtype16):
            got = load_by_flags(path, FlagRequest(load_in_4bit=True, bnb_4bit_compute_dtype=asked), device=device,
                                bf16_supported=bf16_supported)
            rows.append((asked, got.counts["linear4bit"]["compute_dtypes"]))
        got16 = load_by_flags(path, FlagRequest(dtype="float16"), device=device, bf16_supported=bf16_supported)
        rows.append(("dtype=float16", got16.counts["linear"]["dtypes"]))
        ok = all(set(d) == {a.removeprefix("dtype=")} for a, d in rows)
        return {"ok": ok, "detail": "; ".join(f"asked {a}: got {d}" for a, d in rows)}

    def prequantised():
        pq = prequantised_copy(path, f"{work_dir}/prequantised-4bit", device=device, bf16_supported=bf16_supported)
        try:
            load_by_flags(pq, FlagRequest(load_in_4bit=False), device=device, bf16_supported=bf16_supported)
        except PrecisionProofError as exc:
            return {"ok": "4-bit (Linear4bit) layers loaded" in str(exc), "detail": f"caught: {exc}"}
        return {"ok": False, "detail": "a pre-quantised checkpoint loaded as 16-bit passed the proof"}

    def wrapper():
        try:
            load_by_flags(path, FlagRequest(load_in_4bit=False), device=device, bf16_supported=bf16_supported,
                          loader=_overriding_wrapper)
        except PrecisionProofError as exc:
            return {"ok": "4-bit (Linear4bit) layers loaded" in str(exc), "detail": f"caught: {exc}"}
        return {"ok": False, "detail": "a wrapper's 4-bit override passed the proof"}

    cases = [("load_in_4bit=False loads no quantised layer", no_flags),
             ("conflicting flags are rejected", conflict),
             ("double quantisation is really on", double_quant),
             ("the compute dtype is what was asked", compute_dtype),
             ("a pre-quantised checkpoint asked as 16-bit is caught", prequantised),
             ("a wrapper that overrides the quantisation config is caught", wrapper)]
    return [_case(name, fn) for name, fn in cases]


def _nested_states(model) -> int:
    """Linear4bit layers whose quantisation state carries the second-level (double) state."""
    import bitsandbytes as bnb

    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = getattr(mod.weight, "quant_state", None)
            if qs is not None and getattr(qs, "nested", False) and getattr(qs, "state2", None) is not None:
                n += 1
    return n


def run_checks(model: str, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Worker job: the loading cases on this host's device for a preset's checkpoint."""
    opts = opts or {}
    from harness.core.models import get_preset
    from harness.cell.build import ensure_checkpoint
    from harness.cell.setup import bf16_supported, pick_device

    device = pick_device(opts.get("device", "auto"))
    bf16 = bf16_supported(device)
    path = ensure_checkpoint(get_preset(model), device=str(device), cache_dir=opts.get("cache_dir"))
    work = tempfile.mkdtemp(prefix="lora-harness-loading-")
    try:
        cases = check_cases(str(path), device=str(device), bf16_supported=bf16, work_dir=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"status": "ok", "model": model, "device": str(device), "bf16_supported": bf16, "cases": cases}
