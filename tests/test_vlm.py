"""Image token and grid arithmetic of the VLM batch builder (pure: no model)."""

import numpy as np
import pytest

from harness.cell import data_vlm
from harness.core.models import get_preset
from harness.core.vlm import IGNORE_INDEX, IMAGE, TEXT, VisionGeometry, assemble_ids, labels_for, layout, min_seq_len, \
    mrope_positions

BIG = VisionGeometry.from_config(get_preset("qwen2.5-vl-7b")["config"])
TINY = VisionGeometry.from_config(get_preset("tiny-qwen2.5-vl")["config"])


def test_geometry_of_the_7b_preset():
    assert (BIG.patch_size, BIG.temporal_patch_size, BIG.merge_size, BIG.channels) == (14, 2, 2, 3)
    assert BIG.special_token_ids == (151655, 151652, 151653)
    # 448 px: 32 x 32 patches of 14 px; 2 x 2 of them merge into one token: 256 tokens
    assert BIG.grid_thw(448) == (1, 32, 32) and BIG.patches(448) == 1024 and BIG.image_tokens(448) == 256
    assert BIG.merged_grid(448) == (1, 16, 16)
    assert BIG.patch_row_values == 3 * 2 * 14 * 14 == 1176
    assert BIG.image_tokens(28) == 1 and BIG.image_tokens(896) == 1024
    for bad in (450, 14, 0):
        with pytest.raises(ValueError, match="multiple of 28"):
            BIG.grid_thw(bad)


def test_layout_counts_text_plus_image_tokens():
    lay = layout(BIG, 2048, 1, 448)
    assert (lay.image_tokens, lay.text_tokens, lay.image_tokens + lay.text_tokens) == (256, 1792, 2048)
    roles = lay.roles()
    assert (roles == IMAGE).sum() == 256 and roles[lay.image_starts[0]] == IMAGE
    assert roles[lay.image_starts[0] - 1] == TEXT and roles[lay.image_starts[0] + 256] == TEXT
    two = layout(TINY, 64, 2, 56)  # 56 px: 2 x 2 merged tokens each
    assert two.image_starts == (4, 10) and two.image_tokens == 8 and two.text_tokens == 56
    assert min_seq_len(BIG, 1, 448) == 3 + 258 + 2
    with pytest.raises(ValueError, match="needs >= 263"):
        layout(BIG, 262, 1, 448)
    assert layout(BIG, 262, 0, 448).image_tokens == 0  # a VLM cell may have no image


def test_ids_markers_and_labels():
    lay = layout(TINY, 20, 2, 28)  # 28 px = 1 token per image
    text = np.arange(10, 10 + 20 - 2 - 4).reshape(1, -1)  # 14 text tokens; the markers take 4 text slots
    ids = assemble_ids(lay, TINY, text)[0]
    start, end, img = TINY.vision_start_token_id, TINY.vision_end_token_id, TINY.image_token_id
    assert ids.tolist() == [10, 11, 12, start, img, end, start, img, end] + list(range(13, 24))
    labels = labels_for(ids[None], TINY)[0]
    assert (labels == IGNORE_INDEX).sum() == 2 and labels[4] == IGNORE_INDEX and labels[3] == start
    with pytest.raises(ValueError, match="collide"):
        assemble_ids(lay, TINY, np.full((1, 14), img))
    with pytest.raises(ValueError, match="text tokens given"):
        assemble_ids(lay, TINY, text[:, :5])


def test_mrope_positions_by_hand():
    # prefix text 0 1 2, <start> at 3, a 2 x 2 merged image at 4 (t=4, h=4..5, w=4..5),
    # then text resumes at 4 + max(2, 2) = 6 with <end>
    lay = layout(TINY, 11, 1, 56)
    pos = mrope_positions(lay, TINY)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 6, 7, 8]
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    text_only = mrope_positions(layout(TINY, 5, 0, 56), TINY)
    assert (text_only == np.arange(5)).all()


def test_patchify_puts_each_patch_where_the_vision_tower_expects_it():
    """Row r is the patch at merge window (r // m**2), cell (r % m**2) of that window, both
    row-major; its values are (channel, frame, y, x), the Conv3d patch embedding's order;
    a still image fills both frames of the temporal patch."""
    g, size = BIG, 112
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, size, size)).astype(np.float32)
    rows = data_vlm.patchify(image, g)
    p, m = g.patch_size, g.merge_size
    assert rows.shape == (g.patches(size), g.patch_row_values)
    windows_per_row = size // (p * m)
    for r in (0, 1, 2, 3, 4, 17, len(rows) - 1):
        win, cell = divmod(r, m * m)
        py = (win // windows_per_row) * m + cell // m
        px = (win % windows_per_row) * m + cell % m
        patch = image[:, py * p:(py + 1) * p, px * p:(px + 1) * p]
        expect = np.stack([patch, patch], axis=1)  # (channel, frame, y, x)
        assert np.array_equal(rows[r], expect.reshape(-1)), r


def test_sample_arrays_are_consistent_and_deterministic():
    lay, batches = data_vlm.make_batches(TINY, seq_len=64, image_count=2, image_size_px=56, vocab_size=1024,
                                         batch_size=3, n_batches=2, seed=5)
    b = batches[0]
    assert b["input_ids"].shape == b["labels"].shape == (3, 64)
    assert b["position_ids"].shape == (3, 3, 64)
    # placeholders in the text == tokens the vision tower will emit for the images given
    n_placeholders = int((b["input_ids"] == TINY.image_token_id).sum())
    grid = b["image_grid_thw"]
    assert grid.shape == (6, 3) and b["pixel_values"].shape == (int(grid.prod(axis=1).sum()), 1176)
    assert n_placeholders == int(grid.prod(axis=1).sum()) // TINY.merge_size ** 2 == 3 * lay.image_tokens
    assert abs(float(b["pixel_values"].mean())) < 1.0  # normalised, not raw [0, 1]
    again = data_vlm.make_batches(TINY, seq_len=64, image_count=2, image_size_px=56, vocab_size=1024, batch_size=3,
                                  n_batches=2, seed=5)[1]
    assert all(np.array_equal(b[k], again[0][k]) for k in b)
    assert not np.array_equal(batches[0]["pixel_values"], batches[1]["pixel_values"])  # fresh images each step
