"""Synthetic multimodal batches for Qwen2-VL-style models. Pure module (numpy, no torch).

A batch is what a Qwen2.5-VL processor would hand the model for ``batch_size`` samples of
``image_count`` square images each, plus text:

- ``pixel_values``: real pixel tensors. Each image is random RGB in [0, 1], normalised with
  the processor's CLIP mean / std, repeated to one temporal patch and cut into patch rows
  in the order the vision tower expects (see :func:`patchify`);
- ``image_grid_thw``: one (t, h, w) row per image, all samples' images in order;
- ``input_ids``: text from the learnable token chain (``harness.cell.data``) with each image's
  ``<vision_start>``, placeholders and ``<vision_end>`` at the layout's positions;
- ``labels``: ``input_ids`` with the placeholders masked (-100): the loss is on text;
- ``position_ids``: [3, batch, seq_len] M-RoPE positions, computed here so the model does
  not need the processor's token-type ids to compute them itself.

Every array is deterministic in the seed, like the text batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.cell import data
from harness.core.vlm import Layout, VisionGeometry, assemble_ids, labels_for, layout, mrope_positions

# The Qwen2-VL image processor's normalisation (OpenAI CLIP's per-channel mean and std).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def synthetic_images(count: int, size_px: int, seed: int, channels: int = 3) -> np.ndarray:
    """[count, channels, size, size] float32 images, normalised as the processor does."""
    rng = np.random.default_rng(seed)
    raw = rng.random((count, channels, size_px, size_px), dtype=np.float32)
    mean = np.asarray(IMAGE_MEAN[:channels], dtype=np.float32).reshape(1, channels, 1, 1)
    std = np.asarray(IMAGE_STD[:channels], dtype=np.float32).reshape(1, channels, 1, 1)
    return (raw - mean) / std


def patchify(image: np.ndarray, geom: VisionGeometry) -> np.ndarray:
    """One [channels, H, W] image -> [patches, channels * temporal * patch**2] rows.

    Row order: merge windows in row-major order, and inside each window its merge x merge
    patches row-major, so the patch merger (which joins consecutive groups of merge**2
    rows) joins spatial neighbours. Values inside a row: channel, frame, pixel row, pixel
    column: the order of the vision tower's Conv3d patch embedding.
    """
    c, height, width = image.shape
    p, m, tp = geom.patch_size, geom.merge_size, geom.temporal_patch_size
    if c != geom.channels or height % (p * m) or width % (p * m):
        raise ValueError(f"image of shape {image.shape} does not fit patch {p} x merge {m} with {geom.channels} channels")
    frames = np.broadcast_to(image, (tp, c, height, width))  # a still image fills one temporal patch
    bh, bw = height // (p * m), width // (p * m)
    # split each spatial axis into (merge window, patch in window, pixel in patch)
    x = frames.reshape(tp, c, bh, m, p, bw, m, p)
    axes = {"frame": 0, "chan": 1, "win_r": 2, "in_r": 3, "px_r": 4, "win_c": 5, "in_c": 6, "px_c": 7}
    order = [axes[k] for k in ("win_r", "win_c", "in_r", "in_c", "chan", "frame", "px_r", "px_c")]
    return np.ascontiguousarray(x.transpose(order)).reshape(bh * bw * m * m, geom.patch_row_values)


def make_sample_arrays(geom: VisionGeometry, lay: Layout, *, vocab_size: int, batch_size: int,
                       seed: int) -> dict[str, Any]:
    """One step's batch as numpy arrays (see the module docstring)."""
    n_text = lay.text_tokens - 2 * lay.image_count  # the markers take text positions
    text = data.sample_tokens(vocab_size, n_text, batch_size, seed)
    ids = assemble_ids(lay, geom, text)
    out: dict[str, Any] = {"input_ids": ids, "labels": labels_for(ids, geom)}
    pos = mrope_positions(lay, geom)
    out["position_ids"] = np.repeat(pos[:, None, :], batch_size, axis=1)  # [3, batch, seq_len]
    if lay.image_count:
        imgs = synthetic_images(batch_size * lay.image_count, lay.image_size_px, seed + 7_919, geom.channels)
        out["pixel_values"] = np.concatenate([patchify(im, geom) for im in imgs])
        out["image_grid_thw"] = np.asarray([geom.grid_thw(lay.image_size_px)] * len(imgs), dtype=np.int64)
    return out


def make_batches(geom: VisionGeometry, *, seq_len: int, image_count: int, image_size_px: int, vocab_size: int,
                 batch_size: int, n_batches: int, seed: int, start: int = 0) -> tuple[Layout, list[dict[str, Any]]]:
    """The layout and one batch per step (batch i drawn from seed (seed, i), as for text),
    for steps ``start`` ... ``start + n_batches - 1``."""
    lay = layout(geom, seq_len, image_count, image_size_px)
    return lay, [make_sample_arrays(geom, lay, vocab_size=vocab_size, batch_size=batch_size,
                                    seed=seed * 100_003 + i) for i in range(start, start + n_batches)]
