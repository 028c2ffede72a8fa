"""The model's inputs for every training step, chosen by the model's kind (worker side).

``build`` returns one input dict per step (CPU tensors; the loop moves each to the device
when its step starts) and the facts the record keeps about them:

- causal LM: ``input_ids`` = ``labels`` = a sequence of the learnable token chain
  (``harness.cell.data``); every position is text.
- vision-language model (its config has a ``vision_config``): synthetic images and text
  (``harness.cell.data_vlm``): ``input_ids`` with image placeholders, ``labels`` with the
  placeholders masked, ``pixel_values``, ``image_grid_thw`` and M-RoPE ``position_ids``.

In both, the cell's ``seq_len`` is every token the language model processes (text plus
image tokens) and tokens/s counts all of them; the record says how many were which.

``vision_flops`` adds the vision tower's work to the FLOP count, which otherwise assumes
each linear layer runs once per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.core.vlm import IGNORE_INDEX, VisionGeometry

# A local vision-language checkpoint (no preset) gets one image of this many pixels a side.
FALLBACK_IMAGE_SIZE_PX = 448


@dataclass(frozen=True)
class StepInputs:
    batches: list[dict[str, Any]]  # one dict of CPU tensors per step (warm-up first)
    info: dict[str, Any] = field(default_factory=dict)  # goes into the record


def model_kind(config: Any) -> str:
    return "vision-language" if getattr(config, "vision_config", None) is not None else "causal-lm"


def text_config(config: Any) -> Any:
    """The language model's config (a composite VLM config keeps it in ``text_config``)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def build(spec, config: Any, preset: dict[str, Any] | None, n_steps: int, start: int = 0) -> StepInputs:
    """``n_steps`` batches for ``spec`` on a model with this (transformers) ``config``;
    ``start`` > 0 gives the batches of steps ``start``, ``start + 1``, ... (the same ones a
    single call for more steps would have built: the adaptive window extends its
    batches this way)."""
    import numpy as np
    import torch

    from harness.cell import data
    from harness.cell import data_vlm
    from harness.core.models import image_defaults

    vocab = int(text_config(config).vocab_size)
    if model_kind(config) == "causal-lm":
        if spec.image_count or spec.image_size_px:
            raise ValueError(f"{spec.model} takes no images (--images / --image-size are for vision-language models)")
        arrays = data.make_batches(vocab, spec.seq_len, spec.batch_size, n_steps, spec.seed, start=start)
        batches = []
        for a in arrays:
            ids = torch.from_numpy(a)
            batches.append({"input_ids": ids, "labels": ids})
        info = {"model_kind": "causal-lm", "text_tokens": spec.seq_len, "image_tokens": 0, "image_count": 0,
                "loss_tokens": spec.seq_len - 1}
        return StepInputs(batches, info)

    count, size = image_defaults(preset) if preset else (1, FALLBACK_IMAGE_SIZE_PX)
    count = count if spec.image_count is None else spec.image_count
    size = size if spec.image_size_px is None else spec.image_size_px
    geom = VisionGeometry.from_config(config)
    lay, arrays = data_vlm.make_batches(geom, seq_len=spec.seq_len, image_count=count, image_size_px=size,
                                       vocab_size=vocab, batch_size=spec.batch_size, n_batches=n_steps, seed=spec.seed,
                                       start=start)
    batches = [{k: torch.from_numpy(v) for k, v in a.items()} for a in arrays]
    labels = arrays[0]["labels"][0]
    info = {
        "model_kind": "vision-language",
        "text_tokens": lay.text_tokens,  # per sequence, vision markers included
        "image_tokens": lay.image_tokens,  # per sequence
        "image_count": count,  # per sequence
        "image_size_px": size if count else None,
        "image_grid_thw": list(geom.grid_thw(size)) if count else None,
        "vision_patches": count * geom.patches(size) if count else 0,  # vision tower rows per sequence
        # the loss predicts position i + 1 from i: labels[1:] that are not masked
        "loss_tokens": int(np.count_nonzero(labels[1:] != IGNORE_INDEX)),
    }
    return StepInputs(batches, info)


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """The batch on ``device``; a tensor used twice (text ids as their own labels) is moved once."""
    moved: dict[int, Any] = {}
    out = {}
    for k, v in batch.items():
        if id(v) not in moved:
            moved[id(v)] = v.to(device, non_blocking=True)
        out[k] = moved[id(v)]
    return out


def vision_flops(model, tower: str | None, info: dict[str, Any], batch_size: int,
                 checkpointed_layers) -> dict[str, Any]:
    """The vision tower's matmul FLOPs of one training step, counted like the text part.

    Linear layers inside the tower's repeated blocks run once per patch, the others (the
    patch merger) once per image token. Forward is 2 FLOPs per weight and row; the
    backward pass is only needed when the tower trains (LoRA on it): input gradients
    (2 per frozen weight) plus LoRA's input and weight gradients (4 per LoRA weight).
    Vision attention scores (mostly 64-patch windows) are not counted: about 2% of the
    tower's FLOPs at 448 px. With no tower (a text model) everything is zero.
    """
    import torch

    out = {"vision_matmul_params": 0, "vision_lora_matmul_params": 0, "vision_flops_per_step": 0.0}
    patches = int(info.get("vision_patches") or 0)
    if not tower:
        return out
    in_block = {id(m) for layer in checkpointed_layers for m in layer.modules()}
    tokens = int(info.get("image_tokens") or 0)
    frozen_fwd = lora_fwd = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not _under(name, tower):
            continue
        n = int(mod.in_features) * int(mod.out_features)
        rows = patches if id(mod) in in_block else tokens
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            out["vision_lora_matmul_params"] += n
            lora_fwd += 2.0 * n * rows
        else:
            out["vision_matmul_params"] += n
            frozen_fwd += 2.0 * n * rows
    trains = out["vision_lora_matmul_params"] > 0
    out["vision_flops_per_step"] = batch_size * (frozen_fwd * (2 if trains else 1) + 3 * lora_fwd)
    return out


def _under(name: str, path: str) -> bool:
    """Whether module ``name`` lies under the dotted ``path`` (also inside peft wrappers)."""
    return f".{path}." in f".{name}."
