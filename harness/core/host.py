"""Hardware and software fingerprint of a host.

``quick_facts`` runs in the parent (pytest / CLI) and imports no torch: NVML and package
metadata only, enough to pick defaults and predict unsupported cells. ``collect`` runs in
a worker process (imports torch, initialises CUDA) and is stored as ``env.json`` in
every run folder.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import shutil
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "nvidia-ml-py", "pytest",
            "pytest-benchmark", "pandas", "matplotlib", "numpy", "safetensors", "triton", "liger-kernel", "unsloth",
            "unsloth_zoo", "trl", "flash-attn", "ray")


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def nvml_gpus() -> tuple[list[dict[str, Any]], str | None, str | None]:
    """(gpus, driver_version, error) from NVML; an empty list where there is no NVIDIA GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        return [], None, f"{type(exc).__name__}: {exc}"
    gpus = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            try:
                cc = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc_s = f"{cc[0]}.{cc[1]}"
            except Exception:
                cc_s = None
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            gpus.append({"index": i, "name": name, "compute_capability": cc_s, "memory_total_bytes": int(mem.total),
                         "memory_used_bytes": int(mem.used),
                         "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid})
        return gpus, driver, None
    except Exception as exc:
        return gpus, None, f"{type(exc).__name__}: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


# Versions the capability rules (harness.plan.capability) compare against their floors.
RULE_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton", "liger-kernel", "unsloth",
                 "unsloth_zoo")


def nvml_cuda_driver_version() -> str | None:
    """The CUDA version the installed driver supports ("13.0"), from NVML; None without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        v = int(pynvml.nvmlSystemGetCudaDriverVersion())  # e.g. 13000
        return f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built for, read from ``torch/version.py`` without
    importing torch (the parent side must not: importing it costs seconds and may touch
    the GPU). None for CPU-only builds or when torch is missing."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        try:
            with open(os.path.join(loc, "version.py")) as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        return m.group(1) if m else None
    return None


def quick_facts() -> dict[str, Any]:
    """Cheap facts for the parent process: GPUs via NVML, which packages are installed."""
    gpus, driver, err = nvml_gpus()
    cc = gpus[0]["compute_capability"] if gpus else None
    return {
        "has_gpu": bool(gpus),
        "gpus": gpus,
        "driver_version": driver,
        "nvml_error": err,
        "gpu_name": gpus[0]["name"] if gpus else None,
        "compute_capability": cc,
        "bf16_supported": (float(cc) >= 8.0) if cc else (None if gpus else True),
        "bitsandbytes_installed": importlib.util.find_spec("bitsandbytes") is not None,
        # what the capability rules need beyond the above
        "packages": {p: _version(p) for p in RULE_PACKAGES},
        "torch_cuda_version": torch_cuda_build(),
        "driver_cuda_version": nvml_cuda_driver_version() if gpus else None,
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "stack_requirements": stack_requirements(),
        # torch.compile's Inductor builds C++ (CPU) or Triton's launchers (GPU) with it
        "c_compiler": next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None),
    }


def unmet_requirements(dist: str, against: tuple[str, ...] = ("torch", "transformers", "peft", "triton")) -> list[str]:
    """Requirements an installed distribution declares on ``against`` that the installed
    versions do not meet, e.g. ``['transformers<=5.17.0 (installed 5.25.0)']``."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging comes with pip
        return []
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        return []
    out = []
    for text in reqs:
        try:
            req = Requirement(text)
        except Exception:  # noqa: BLE001 - an unparsable line says nothing about us
            continue
        if req.name.lower() not in against or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        have = _version(req.name)
        if have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name}{req.specifier} (installed {have})")
    return out


def stack_requirements() -> dict[str, list[str]]:
    """Per optional stack package that is installed: its unmet requirements on torch,
    transformers, peft and triton (the capability rules turn them into reasons)."""
    return {d: unmet_requirements(d) for d in ("liger-kernel", "unsloth", "unsloth_zoo") if _version(d)}


def summary(env: dict[str, Any]) -> str:
    """One line for headers and progress output."""
    pk = env.get("packages", {})
    dev = env.get("gpu_name") or "CPU (no GPU)"
    return (f"{dev}; torch {pk.get('torch')}, transformers {pk.get('transformers')}, peft {pk.get('peft')}, "
            f"bitsandbytes {pk.get('bitsandbytes')}")


def import_root() -> str:
    """The folder that holds the ``harness`` package: put on a child process's PYTHONPATH
    so workers import this harness, installed or not (GPU hosts run it from a checkout)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2])
