"""Image token and grid arithmetic of Qwen2-VL-style vision-language models. Pure module
(numpy, no torch): what a Qwen2.5-VL processor and the model's ``get_rope_index`` would
compute for synthetic square images, so a cell needs no image processor.

The arithmetic, for an image of S x S pixels (S a multiple of patch x merge):

- the vision tower cuts it into ``patch_size`` x ``patch_size`` patches; a still image is a
  one-frame video, repeated to fill one ``temporal_patch_size`` slab, so its grid is
  (t, h, w) = (1, S / patch, S / patch) and ``pixel_values`` holds t * h * w rows of
  ``channels * temporal_patch_size * patch_size**2`` values;
- the patch merger joins ``merge x merge`` neighbouring patches into one token for the
  language model: t * h * w / merge**2 image tokens (448 px, patch 14, merge 2: 256);
- in the text each image is ``<vision_start>``, one ``<image_pad>`` placeholder per image
  token, ``<vision_end>``; the model swaps the placeholders for the vision tower's output;
- M-RoPE positions: text tokens advance all three (temporal, height, width) components
  together; an image's tokens take (p, p + row, p + column) over its merged grid, and the
  text after it restarts at p + max(merged rows, merged columns).

A cell's sequence length counts every token the language model sees: text (markers
included) plus image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Text before the first image, like a chat template's "<|im_start|>user\n" (3 tokens in
# Qwen's tokenizer): images sit near the start of a sequence, as in a real SFT sample.
PREFIX_TEXT_TOKENS = 3
# Text after the last image: at least this much, so every sequence has text to learn.
MIN_TRAILING_TEXT_TOKENS = 2
IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)
TEXT, IMAGE = 0, 1  # token roles (what transformers calls mm_token_type_ids)


@dataclass(frozen=True)
class VisionGeometry:
    """The numbers of a Qwen2-VL-style vision tower that fix the image token arithmetic."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    channels: int
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    @classmethod
    def from_config(cls, config: Any) -> "VisionGeometry":
        """From a preset's ``config`` dict or a transformers config object."""

        def get(obj: Any, key: str, default: Any = None) -> Any:
            return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)

        vc = get(config, "vision_config")
        if vc is None:
            raise ValueError("the model config has no vision_config: not a vision-language model")
        return cls(
            patch_size=int(get(vc, "patch_size", 14)),
            temporal_patch_size=int(get(vc, "temporal_patch_size", 2)),
            merge_size=int(get(vc, "spatial_merge_size", 2)),
            channels=int(get(vc, "in_channels", None) or get(vc, "in_chans", 3)),
            image_token_id=int(get(config, "image_token_id")),
            vision_start_token_id=int(get(config, "vision_start_token_id")),
            vision_end_token_id=int(get(config, "vision_end_token_id")),
        )

    @property
    def token_edge_px(self) -> int:
        """Pixels along one edge of the square that becomes one image token (patch x merge)."""
        return self.patch_size * self.merge_size

    @property
    def patch_row_values(self) -> int:
        """Values in one row of ``pixel_values``: channels x temporal patch x patch area."""
        return self.channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def special_token_ids(self) -> tuple[int, int, int]:
        return (self.image_token_id, self.vision_start_token_id, self.vision_end_token_id)

    def check_size(self, size_px: int) -> None:
        """A processor resizes images to multiples of patch x merge; we ask for such sizes."""
        edge = self.token_edge_px
        if size_px < edge or size_px % edge:
            lo = max(edge, size_px // edge * edge)
            raise ValueError(f"image size {size_px} px is not a multiple of {edge} px (patch {self.patch_size} x "
                             f"merge {self.merge_size}); try {lo} or {lo + edge}")

    def grid_thw(self, size_px: int) -> tuple[int, int, int]:
        """(temporal, height, width) patch grid of one still image, as ``image_grid_thw`` holds it."""
        self.check_size(size_px)
        side = size_px // self.patch_size
        return (1, side, side)

    def patches(self, size_px: int) -> int:
        """Rows of ``pixel_values`` for one image (the vision tower's sequence length)."""
        t, h, w = self.grid_thw(size_px)
        return t * h * w

    def image_tokens(self, size_px: int) -> int:
        """Tokens one image becomes in the language model's sequence."""
        return self.patches(size_px) // self.merge_size ** 2

    def merged_grid(self, size_px: int) -> tuple[int, int, int]:
        t, h, w = self.grid_thw(size_px)
        return (t, h // self.merge_size, w // self.merge_size)


@dataclass(frozen=True)
class Layout:
    """Where the images go in one sequence of ``seq_len`` tokens (the same for every row)."""

    seq_len: int
    image_count: int
    image_size_px: int
    tokens_per_image: int
    image_starts: tuple[int, ...]  # index of each image's first placeholder token

    @property
    def image_tokens(self) -> int:
        return self.image_count * self.tokens_per_image

    @property
    def text_tokens(self) -> int:
        """Everything that is not an image placeholder: text and the vision markers."""
        return self.seq_len - self.image_tokens

    def roles(self) -> np.ndarray:
        """[seq_len] int array: IMAGE at placeholder positions, TEXT elsewhere."""
        r = np.full(self.seq_len, TEXT, dtype=np.int64)
        for s in self.image_starts:
            r[s:s + self.tokens_per_image] = IMAGE
        return r


def min_seq_len(geom: VisionGeometry, image_count: int, size_px: int) -> int:
    """Shortest sequence that holds the images, their markers and some text."""
    if image_count == 0:
        return 2
    return PREFIX_TEXT_TOKENS + image_count * (geom.image_tokens(size_px) + 2) + MIN_TRAILING_TEXT_TOKENS


def layout(geom: VisionGeometry, seq_len: int, image_count: int, size_px: int) -> Layout:
    """Prefix text, then each image as <start> placeholders <end>, then the rest is text."""
    if image_count < 0:
        raise ValueError(f"image count must be >= 0, got {image_count}")
    need = min_seq_len(geom, image_count, size_px)
    if seq_len < need:
        raise ValueError(f"sequence length {seq_len} cannot hold {image_count} image(s) of {size_px} px "
                         f"({geom.image_tokens(size_px)} tokens each, plus markers and text): needs >= {need}")
    n = geom.image_tokens(size_px) if image_count else 0
    starts = tuple(PREFIX_TEXT_TOKENS + i * (n + 2) + 1 for i in range(image_count))
    return Layout(seq_len, image_count, size_px, n, starts)


def assemble_ids(lay: Layout, geom: VisionGeometry, text: np.ndarray) -> np.ndarray:
    """[batch, seq_len] input ids: ``text`` ([batch, text_tokens - 2 * images]) fills the
    text positions in order, markers and placeholders fill the rest."""
    batch = text.shape[0]
    ids = np.empty((batch, lay.seq_len), dtype=np.int64)
    is_text = lay.roles() == TEXT
    for s in lay.image_starts:  # markers sit on text positions around each image
        is_text[s - 1] = is_text[s + lay.tokens_per_image] = False
        ids[:, s - 1] = geom.vision_start_token_id
        ids[:, s + lay.tokens_per_image] = geom.vision_end_token_id
        ids[:, s:s + lay.tokens_per_image] = geom.image_token_id
    if text.shape[1] != int(is_text.sum()):
        raise ValueError(f"{text.shape[1]} text tokens given for {int(is_text.sum())} text positions")
    if np.isin(text, geom.special_token_ids).any():
        raise ValueError("text tokens collide with the image / vision marker token ids")
    ids[:, is_text] = text
    return ids


def labels_for(ids: np.ndarray, geom: VisionGeometry) -> np.ndarray:
    """Labels = ids with image placeholders masked: the loss is on text (markers included)."""
    labels = ids.copy()
    labels[ids == geom.image_token_id] = IGNORE_INDEX
    return labels


def mrope_positions(lay: Layout, geom: VisionGeometry) -> np.ndarray:
    """[3, seq_len] (temporal, height, width) rotary positions of one sequence."""
    pos = np.empty((3, lay.seq_len), dtype=np.int64)
    _, gh, gw = geom.merged_grid(lay.image_size_px) if lay.image_count else (1, 0, 0)
    rows, cols = np.divmod(np.arange(gh * gw), max(gw, 1))
    i = p = 0
    for s in list(lay.image_starts) + [lay.seq_len]:
        n_text = s - i
        pos[:, i:s] = p + np.arange(n_text)  # text: one step per token on all three axes
        p += n_text
        i = s
        if s == lay.seq_len:
            break
        e = s + lay.tokens_per_image
        pos[0, s:e] = p  # a still image is one temporal step
        pos[1, s:e] = p + rows
        pos[2, s:e] = p + cols
        p += max(gh, gw)
        i = e
    return pos
