"""Building and loading models (worker side: imports torch and transformers).

- 16/32-bit cells build the model from its config straight on the device, with random
  weights from the cell's seed: no checkpoint, no host copy (an 8B model in under a
  second on an H200, see ../shared/GPU.md).
- Quantised cells, and any cell with ``load=pretrained``, go through the real
  ``from_pretrained(path, quantization_config=...)`` path. For presets the path is a
  synthetic checkpoint, written once into the cache folder and reused by every cell.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from harness.core.models import get_preset

CACHE_ENV = "LORA_HARNESS_CACHE"
# Weights of synthetic checkpoints are drawn from this seed, whatever the cell's seed, so
# all cells of a preset (and all precisions) share the same base weights.
CHECKPOINT_SEED = 1234
# free disk space a synthetic checkpoint needs beyond its own size
CHECKPOINT_DISK_MARGIN_BYTES = 2 << 30


class CheckpointTooLarge(RuntimeError):
    """The synthetic checkpoint would not fit the cache folder's disk (the cell is unsupported there)."""


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lora-harness")
    return Path(root)


def make_config(preset: dict[str, Any]):
    from transformers import AutoConfig

    cfg = dict(preset["config"])
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def _model_class(config):
    """The auto class for the model's kind: a config with a ``vision_config`` is a
    vision-language model (Qwen2.5-VL: ``Qwen2_5_VLForConditionalGeneration``), whose
    language-model head transformers maps under image-text-to-text, not causal LM."""
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def build_from_config(preset: dict[str, Any], *, dtype, device: str, seed: int, attn_implementation: str):
    """Random-weight model built directly on ``device`` (no host round trip)."""
    import torch

    config = make_config(preset)
    torch.manual_seed(seed)
    with torch.device(device):
        model = _model_class(config).from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    apply_init_overrides(model, preset)
    return model


def apply_init_overrides(model, preset: dict[str, Any]) -> int:
    """Fill the parameters a preset names (``init_overrides``) after random init.

    This builds models with a known numerical property from a config alone, e.g.
    ``tiny-overflow``, whose MLP activations exceed float16's range. Each override is
    ``{"parameter": <name suffix>, "fill": <value>}``; returns how many tensors changed.
    An override that matches nothing is an error: a preset must mean what it says.
    """
    import torch

    changed = 0
    for ov in preset.get("init_overrides") or ():
        hits = [p for n, p in model.named_parameters() if n.endswith(ov["parameter"])]
        if not hits:
            raise ValueError(f"preset {preset.get('name')}: init override {ov['parameter']!r} matches no parameter")
        with torch.no_grad():
            for p in hits:
                p.fill_(float(ov["fill"]))
        changed += len(hits)
    return changed


def checkpoint_dir(preset: dict[str, Any], cache_dir: str | None = None) -> Path:
    key_data: Any = preset["config"]
    if preset.get("init_overrides"):  # other weights, other checkpoint (other presets keep their key)
        key_data = {"config": preset["config"], "init_overrides": preset["init_overrides"]}
    blob = json.dumps(key_data, sort_keys=True).encode()
    key = hashlib.sha1(blob).hexdigest()[:10]
    return cache_root(cache_dir) / "checkpoints" / f"{preset['name']}-{key}"


def parameter_count(preset: dict[str, Any]) -> int:
    """Parameters of the preset's model, counted on the meta device (no memory, ~1 s for 70B)."""
    import torch

    config = make_config(preset)
    with torch.device("meta"):
        model = _model_class(config).from_config(config, dtype=torch.bfloat16)
    return int(sum(p.numel() for p in model.parameters()))


def check_disk_for_checkpoint(preset: dict[str, Any], folder: Path) -> int:
    """Raise CheckpointTooLarge when the bf16 checkpoint (2 bytes a parameter) would not fit
    the disk holding ``folder`` (Llama-3.1-70B is ~141 GB; the H200 hosts have
    64-128 GiB of disk). Returns the checkpoint's size in bytes."""
    size = 2 * parameter_count(preset)
    free = shutil.disk_usage(folder).free
    if size + CHECKPOINT_DISK_MARGIN_BYTES > free:
        raise CheckpointTooLarge(
            f"the synthetic bf16 checkpoint of {preset['name']} ({size / 1e9:.0f} GB) does not fit the free disk space "
            f"of {folder} ({free / 1e9:.0f} GB free): quantised cells of this model load through from_pretrained "
            "and cannot run on this host (16-bit cells build from the config and need no checkpoint)")
    return size


def ensure_checkpoint(preset: dict[str, Any], *, device: str, cache_dir: str | None = None, log=print) -> Path:
    """The synthetic checkpoint for ``preset``, written on first use (bf16 safetensors).

    Written into a temporary folder and renamed into place, so a crash mid-write never
    leaves a half checkpoint that later cells would load. Writers take an exclusive lock
    on a file beside it first (with ``--gpus 0,1`` two worker servers may want
    the same checkpoint at once): the second waits for the first, then finds the
    checkpoint complete and loads it, instead of building and writing a second copy.
    """
    final = checkpoint_dir(preset, cache_dir)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    t_wait = time.perf_counter()
    with open(final.parent / f".{final.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        if _complete(final):
            log(f"synthetic checkpoint for {preset['name']} written by another worker "
                f"(waited {time.perf_counter() - t_wait:.1f} s)")
            return final
        check_disk_for_checkpoint(preset, final.parent)  # fail clearly, not with ENOSPC mid-write
        _write_checkpoint(preset, final, device=device, log=log)
    return final


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / ".complete").is_file()


def _write_checkpoint(preset: dict[str, Any], final: Path, *, device: str, log) -> None:
    import torch

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    t0 = time.perf_counter()
    log(f"writing synthetic checkpoint for {preset['name']} to {final} (once)")
    model = build_from_config(preset, dtype=torch.bfloat16, device=device, seed=CHECKPOINT_SEED, attn_implementation="sdpa")
    model.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps({"preset": preset["name"], "seed": CHECKPOINT_SEED}))
    del model
    if str(device).startswith("cuda"):
        # Give the build's blocks back to the driver: otherwise the caching allocator keeps
        # them reserved, NVML counts them in the cell that follows, and a VRAM budget sees
        # memory the cell never used (seen on the H200: int8 VLM cell, NVML 23.5 GiB vs
        # torch's 13.5 GiB).
        torch.cuda.empty_cache()
    if final.exists():  # a leftover without .complete (an older harness, a crash): replace it
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:  # a writer without the lock finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"checkpoint written in {time.perf_counter() - t0:.1f} s")


def ensure_checkpoint_job(model: str, cache_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """A worker job (the overhead benchmarks'): write ``model``'s synthetic checkpoint if needed,
    on the GPU where there is one, and say where it is."""
    import torch

    dev = "cuda:0" if device != "cpu" and torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    path = ensure_checkpoint(get_preset(model), device=dev, cache_dir=cache_dir, log=lambda m: print(m, flush=True))
    return {"status": "ok", "path": str(path), "seconds": time.perf_counter() - t0}


def load_pretrained(path: str | os.PathLike, *, load_kwargs: dict[str, Any], device: str, attn_implementation: str):
    """The real ``from_pretrained`` path (quantisation configs go through it)."""
    from transformers import AutoConfig

    return _model_class(AutoConfig.from_pretrained(str(path))).from_pretrained(
        str(path), device_map={"": device}, attn_implementation=attn_implementation, **load_kwargs
    )


# -- pre-quantised int8 checkpoints -----------------------------------------------------
# Loading the 8B shape with load_in_8bit takes ~20 s on the H200 (transformers' 8-bit
# conversion of every weight), against ~3 s for 4-bit. bitsandbytes' int8 layers serialise
# (int8 weights + their SCB row scales), so the conversion can be done once per cache
# folder: the first int8 cell's worker loads the bf16 checkpoint with the cell's
# BitsAndBytesConfig, saves the quantised model, and every int8 cell loads that folder
# through the same ``from_pretrained`` call. The quantisation is deterministic, so the
# layers and their weights are the ones the conversion gives (tested on the CPU backend:
# the same int8 weights, scales and losses).


def prequantized_int8_dir(preset: dict[str, Any], load_kwargs: dict[str, Any], device: str,
                          cache_dir: str | None = None) -> Path:
    """Cache folder of ``preset``'s int8 checkpoint for these loading settings: keyed by
    the base checkpoint, the int8 settings, the compute dtype, bitsandbytes' version and
    the device kind (each backend quantises with its own kernel)."""
    import bitsandbytes

    qc = load_kwargs["quantization_config"]
    key_data = {"base": checkpoint_dir(preset, cache_dir).name, "threshold": qc.llm_int8_threshold,
                "skip": list(qc.llm_int8_skip_modules or []), "fp16_weight": qc.llm_int8_has_fp16_weight,
                "dtype": str(load_kwargs.get("dtype")), "bnb": bitsandbytes.__version__,
                "device": str(device).split(":")[0]}
    key = hashlib.sha1(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root(cache_dir) / "checkpoints" / f"{preset['name']}-int8-{key}"


def ensure_prequantized_int8(preset: dict[str, Any], *, load_kwargs: dict[str, Any], device: str,
                             cache_dir: str | None = None, log=print) -> Path:
    """The int8 checkpoint of ``preset``, written on first use (atomically, like the bf16 one)."""
    final = prequantized_int8_dir(preset, load_kwargs, device, cache_dir)
    if _complete(final):
        return final
    base = ensure_checkpoint(preset, device=device, cache_dir=cache_dir, log=log)
    final.parent.mkdir(parents=True, exist_ok=True)
    # one writer at a time (a checkpoint written ahead of the sweep, a cell that needs it)
    with open(final.parent / f".{final.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not _complete(final):
            _write_prequantized_int8(preset, base, final, load_kwargs=load_kwargs, device=device, log=log)
    return final


def _write_prequantized_int8(preset: dict[str, Any], base: Path, final: Path, *, load_kwargs: dict[str, Any],
                             device: str, log) -> None:
    import torch

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    t0 = time.perf_counter()
    log(f"writing the pre-quantised int8 checkpoint of {preset['name']} to {final} (once)")
    model = load_pretrained(base, load_kwargs=load_kwargs, device=device, attn_implementation="sdpa")
    model.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps({"preset": preset["name"], "from": str(base)}))
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    try:
        os.rename(tmp, final)
    except OSError:  # another worker finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"int8 checkpoint written in {time.perf_counter() - t0:.1f} s")


def prepare_prequantized_int8(spec, opts: dict[str, Any]) -> bool:
    """On a CUDA host, write the int8 checkpoint before the cell measures anything (like
    ``harness.cell.budget_guard.prepare_checkpoint`` for the bf16 one); returns whether it wrote."""
    import gc

    import torch

    from harness.cell.precision import load_kwargs as precision_kwargs

    if not torch.cuda.is_available():
        return False
    preset = get_preset(spec.model)
    from harness.core.models import skip_modules

    kw = precision_kwargs("int8", bf16_supported=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
                          skip_modules=skip_modules(preset))
    if (prequantized_int8_dir(preset, kw, "cuda", opts.get("cache_dir")) / ".complete").is_file():
        return False
    ensure_prequantized_int8(preset, load_kwargs=kw, device="cuda:0", cache_dir=opts.get("cache_dir"),
                             log=lambda m: print(m, flush=True))
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return True


def load_model(spec, *, load_kwargs: dict[str, Any], device: str, cache_dir: str | None = None, log=print,
               prequantized_int8: bool = False):
    """Model for a cell, by the cell's load path. Returns (model, load_info).

    ``prequantized_int8`` (int8 cells of presets): load the pre-quantised int8
    checkpoint (written on first use) through the same ``from_pretrained`` call."""
    t0 = time.perf_counter()
    path = spec.model_path
    how = spec.resolved_load()
    info: dict[str, Any] = {"load_path": how}
    if how == "config":
        if path:
            raise ValueError("a local checkpoint is always loaded with from_pretrained (load=config is for presets)")
        if "quantization_config" in load_kwargs:
            raise ValueError("quantised modes need from_pretrained; load=config is for 16/32-bit cells")
        model = build_from_config(get_preset(spec.model), dtype=load_kwargs["dtype"], device=device,
                                  seed=spec.seed, attn_implementation=spec.attn_implementation)
    else:
        if not path:
            t1 = time.perf_counter()
            preset = get_preset(spec.model)
            target = prequantized_int8_dir(preset, load_kwargs, device, cache_dir) if prequantized_int8 \
                else checkpoint_dir(preset, cache_dir)
            if not (target / ".complete").is_file():
                info["checkpoint_written_in_cell"] = True  # this cell paid for writing it
            if prequantized_int8:
                path = ensure_prequantized_int8(get_preset(spec.model), load_kwargs=load_kwargs, device=device,
                                                cache_dir=cache_dir, log=log)
                info["checkpoint_prequantized"] = True
            else:
                path = ensure_checkpoint(get_preset(spec.model), device=device, cache_dir=cache_dir, log=log)
            info["checkpoint_prepare_s"] = time.perf_counter() - t1
        info["checkpoint"] = str(path)
        with warnings.catch_warnings():
            # a pre-quantised checkpoint carries the same BitsAndBytesConfig (its key says
            # so); transformers warns that it uses the stored one
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
            model = load_pretrained(path, load_kwargs=load_kwargs, device=device,
                                    attn_implementation=spec.attn_implementation)
    info["load_time_s"] = time.perf_counter() - t0
    # from_pretrained returns a model in eval mode; transformers only checkpoints in
    # training mode. Record what we got; the workload puts it in training mode.
    info["loaded_in_training_mode"] = bool(model.training)
    return model, info


def wait_for_writers(cache_dir: str | None = None) -> float:
    """Wait until no process is writing a synthetic checkpoint into this cache (each writer
    holds its checkpoint's lock): a cell must not measure while another process builds a
    model on the same GPU. Returns the seconds waited."""
    folder = cache_root(cache_dir) / "checkpoints"
    if not folder.is_dir():
        return 0.0
    t0 = time.perf_counter()
    for lock_path in sorted(folder.glob(".*.lock")):
        with open(lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH)  # blocks while a writer holds it exclusively
    waited = time.perf_counter() - t0
    return waited if waited > 0.05 else 0.0


def write_ahead(model: str, *, int8: bool = False, cache_dir: str | None = None) -> int:
    """Write a preset's synthetic checkpoint (and its int8 one) before a sweep needs it, so
    a fresh GPU host writes it while the worker server imports its libraries. Cells that
    need it meanwhile wait on its lock instead of writing a second copy."""
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    preset = get_preset(model)
    ensure_checkpoint(preset, device=device, cache_dir=cache_dir, log=lambda m: print(m, flush=True))
    if int8 and device != "cpu":
        from harness.cell.precision import load_kwargs as precision_kwargs
        from harness.core.models import skip_modules

        kw = precision_kwargs("int8", bf16_supported=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
                              skip_modules=skip_modules(preset))
        ensure_prequantized_int8(preset, load_kwargs=kw, device=device, cache_dir=cache_dir,
                                 log=lambda m: print(m, flush=True))
    print(f"checkpoints of {model} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m harness.cell.build",
                                 description="write a preset's synthetic checkpoint(s) ahead of a sweep")
    ap.add_argument("model")
    ap.add_argument("--int8", action="store_true", help="also the pre-quantised int8 checkpoint (GPU hosts)")
    ap.add_argument("--cache-dir", default=None)
    ns = ap.parse_args()
    raise SystemExit(write_ahead(ns.model, int8=ns.int8, cache_dir=ns.cache_dir))
