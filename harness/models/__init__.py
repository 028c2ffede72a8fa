"""Model presets (architecture configs shipped as JSON) and local checkpoints.

Pure module: resolving a name to a preset or a checkpoint path reads JSON only. Building
and loading models lives in ``harness.models.build`` (imports torch).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.spec import SpecError

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class ModelRef:
    """What ``--model`` resolved to: a shipped preset, or a local HF checkpoint."""

    name: str
    path: str | None = None  # local checkpoint folder; None for presets

    @property
    def is_local(self) -> bool:
        return self.path is not None


@lru_cache(maxsize=None)
def _load_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for f in sorted(PRESET_DIR.glob("*.json")):
        data = json.loads(f.read_text())
        presets[data["name"]] = data
    return presets


def preset_names() -> list[str]:
    return list(_load_presets())


def get_preset(name: str) -> dict[str, Any]:
    presets = _load_presets()
    if name not in presets:
        raise SpecError(f"unknown model {name!r}: not a preset ({', '.join(presets)}) nor a local checkpoint folder")
    return presets[name]


def local_name(path: str) -> str:
    """Short, id-safe name for a local checkpoint folder."""
    base = os.path.basename(os.path.normpath(path)) or "checkpoint"
    return "local-" + re.sub(r"[^A-Za-z0-9._-]+", "-", base)


def resolve_model(name_or_path: str) -> ModelRef:
    """A preset name, or a path to a folder holding a Hugging Face ``config.json``."""
    s = str(name_or_path).strip()
    if s in _load_presets():
        return ModelRef(s)
    p = Path(s).expanduser()
    if os.sep in s or s.startswith(".") or p.exists():
        if not (p / "config.json").is_file():
            raise SpecError(f"model path {s!r} is not a Hugging Face checkpoint folder (no config.json there)")
        return ModelRef(local_name(s), str(p.resolve()))
    get_preset(s)  # raises with the list of presets
    raise AssertionError("unreachable")


def skip_modules(preset_or_none: dict[str, Any] | None) -> tuple[str, ...]:
    """Modules bitsandbytes loading leaves unquantised for this model."""
    extra = tuple((preset_or_none or {}).get("keep_unquantized", ()))
    return ("lm_head",) + extra
