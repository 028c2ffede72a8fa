"""Model presets (architecture configs shipped as JSON) and local checkpoints.

Pure module: resolving a name to a preset or a checkpoint path reads JSON only. Building
and loading models lives in ``harness.cell.build`` (imports torch).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.core.errors import SpecError

PRESET_DIR = Path(__file__).with_name("model_presets")


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
    """Modules bitsandbytes loading leaves unquantised for this model (dotted module paths
    from the model's root, or single module names such as ``lm_head``)."""
    extra = tuple((preset_or_none or {}).get("keep_unquantized", ()))
    return ("lm_head",) + extra


# -- vision-language presets ----------------------------------------------------------
# A preset with a ``vision_config`` in its config is a vision-language model. It also names
# its vision tower (``vision_tower``: the module path, for LoRA targeting and FLOPs) and the
# images a cell gets by default (``images``: count and edge length in pixels).


def is_vision_language(preset: dict[str, Any]) -> bool:
    return "vision_config" in preset["config"]


def vision_tower(preset_or_none: dict[str, Any] | None) -> str | None:
    """Module path of the vision tower (``model.visual`` for Qwen2.5-VL), or None."""
    return (preset_or_none or {}).get("vision_tower")


def lora_exclude(preset_or_none: dict[str, Any] | None, include_vision: bool = False) -> str | None:
    """peft ``exclude_modules`` keeping LoRA off the vision tower (unless asked for).

    peft's ``all-linear`` means every linear layer but the output head, the vision tower's
    included; a string ``exclude_modules`` is a regex peft full-matches against module
    names, so this one matches the tower and everything below it.
    """
    tower = vision_tower(preset_or_none)
    if not tower or include_vision:
        return None
    return rf"(.*\.)?{re.escape(tower)}(\..*)?"


def image_defaults(preset_or_none: dict[str, Any] | None) -> tuple[int, int | None]:
    """(images per sample, edge in pixels) a cell of this model gets unless it says otherwise."""
    img = (preset_or_none or {}).get("images") or {}
    return int(img.get("count", 0)), img.get("size_px")


def max_context(name: str, path: str | None = None) -> int:
    """The model's own longest context (``max_position_embeddings``): a preset's from its
    config, a local checkpoint's from its config.json (131,072 when it names none)."""
    if path:
        cfg = json.loads((Path(path) / "config.json").read_text())
    else:
        cfg = get_preset(name)["config"]
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return int(cfg.get("max_position_embeddings") or text_cfg.get("max_position_embeddings") or 131072)


def check_cell(cell):
    """Validate a cell against its model preset; returns the cell with image settings that
    equal the model's defaults cleared (so the id names only what is not the default).

    Raises SpecError for a sequence longer than the model's context, image or vision-LoRA
    settings on a text-only model, image sizes the vision tower cannot cut into tokens, and
    sequences too short for their images.
    """
    from harness.core.vlm import VisionGeometry, min_seq_len  # pure; imported here to keep this light

    longest = max_context(cell.model, cell.model_path)
    if cell.seq_len > longest:
        raise SpecError(f"{cell.model}: sequence length {cell.seq_len:,} is over the model's maximum context of "
                        f"{longest:,} tokens (max_position_embeddings)")
    if cell.model_path:  # the rest needs a preset's vision settings; the worker checks local ones
        return cell
    preset = get_preset(cell.model)
    asked = [n for n, v in (("--images", cell.image_count), ("--image-size", cell.image_size_px),
                            ("--lora-vision", cell.lora.include_vision or None)) if v is not None]
    if not is_vision_language(preset):
        if asked:
            raise SpecError(f"{cell.model} is a text-only model: {', '.join(asked)} apply to vision-language models")
        return cell
    count, size = image_defaults(preset)
    n = count if cell.image_count is None else cell.image_count
    px = size if cell.image_size_px is None else cell.image_size_px
    geom = VisionGeometry.from_config(preset["config"])
    try:
        if n:
            geom.check_size(px)
        need = min_seq_len(geom, n, px)
    except ValueError as exc:
        raise SpecError(f"{cell.model}: {exc}") from None
    if cell.seq_len < need:
        raise SpecError(f"{cell.model}: sequence length {cell.seq_len} cannot hold {n} image(s) of {px} px "
                        f"({geom.image_tokens(px)} image tokens each, plus markers and text); use --seq-len >= {need} "
                        "or fewer / smaller images (--images, --image-size)")
    return cell.replace(image_count=None if n == count else n, image_size_px=None if (px == size or not n) else px)
