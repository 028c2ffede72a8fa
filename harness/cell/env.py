"""The host's full fingerprint, collected in a worker process (imports torch, initialises
CUDA); stored as ``env.json`` in every run folder. The parent's cheap facts are
``harness.core.host.quick_facts``."""

from __future__ import annotations

import importlib.util
import os
import platform
import socket
import sys
from typing import Any

from harness.core.host import PACKAGES, _version, quick_facts

def collect() -> dict[str, Any]:
    """Full fingerprint (worker side): versions, devices, capabilities, backends."""
    import torch

    facts = quick_facts()
    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "packages": {p: _version(p) for p in PACKAGES},
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "driver_version": facts["driver_version"],
        "driver_cuda_version": facts["driver_cuda_version"],
        "nvml_available": facts["nvml_error"] is None,
        "nvml_error": facts["nvml_error"],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        import psutil

        env["ram_total_bytes"] = int(psutil.virtual_memory().total)
    except Exception:
        env["ram_total_bytes"] = None
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({
                "index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                "memory_total_bytes": int(p.total_memory), "multiprocessors": p.multi_processor_count,
                "bf16_supported": bool(p.major >= 8),
            })
    env["devices"] = devices
    env["nvml_gpus"] = facts["gpus"]
    env["device"] = "cuda" if devices else "cpu"
    env["gpu_name"] = devices[0]["name"] if devices else None
    env["bf16_supported"] = (torch.cuda.is_bf16_supported(including_emulation=False) if devices else True)
    env["bitsandbytes"] = _bnb_facts("cuda" if devices else "cpu")
    env["attention"] = _attention_facts()
    return env


def _bnb_facts(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"installed": importlib.util.find_spec("bitsandbytes") is not None}
    if not out["installed"]:
        out["backend"] = None
        out["error"] = "not installed"
        return out
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        import torch

        out["version"] = getattr(bnb, "__version__", None)
        lib = getattr(getattr(bnb, "cextension", None), "lib", None)
        out["library"] = getattr(lib, "_name", None) or (str(lib) if lib is not None else None)
        F.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.float16 if device == "cuda" else torch.float32))
        out["backend"] = device
        out["error"] = None
    except Exception as exc:
        out["backend"] = None
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return out


def _attention_facts() -> dict[str, Any]:
    import torch

    facts = {"sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
             "flash_attn_package": importlib.util.find_spec("flash_attn") is not None}
    # transformers' own verdicts: what attn_implementation values would load here.
    try:
        from transformers.utils import import_utils as iu

        for key, fn in (("flash_attention_2", "is_flash_attn_2_available"),
                        ("flash_attention_3", "is_flash_attn_3_available"),
                        ("flex_attention", "is_torch_flex_attn_available")):
            if hasattr(iu, fn):
                facts[key] = bool(getattr(iu, fn)())
    except Exception as exc:  # a fingerprint never fails on one fact
        facts["transformers_check_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if torch.cuda.is_available():
        try:
            facts["sdpa_flash_kernel"] = bool(torch.backends.cuda.flash_sdp_enabled())
            facts["sdpa_mem_efficient_kernel"] = bool(torch.backends.cuda.mem_efficient_sdp_enabled())
            facts["sdpa_cudnn_kernel"] = bool(torch.backends.cuda.cudnn_sdp_enabled())
        except Exception:
            pass
    return facts
