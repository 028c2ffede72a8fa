"""The VLM batch builder against the real transformers model (tiny, CPU), and the 7B
preset's shape and LoRA targets (on the meta device: no memory, no weights)."""

import inspect

import numpy as np
import pytest
import torch

from harness.cell import inputs
from harness.core.models import get_preset, lora_exclude
from harness.cell.build import _model_class, build_from_config, make_config
from harness.core.spec import CellSpec, LoraSpec


@pytest.fixture(scope="module")
def tiny():
    return build_from_config(get_preset("tiny-qwen2.5-vl"), dtype=torch.float32, device="cpu", seed=0,
                             attn_implementation="sdpa")


def _batch(model, **kw):
    spec = CellSpec(**{"model": "tiny-qwen2.5-vl", "precision": "fp32", "seq_len": 80, "batch_size": 2, **kw})
    built = inputs.build(spec, model.config, get_preset("tiny-qwen2.5-vl"), 1)
    return built.batches[0], built.info


def test_placeholders_match_what_the_vision_tower_emits(tiny):
    batch, info = _batch(tiny, image_count=2, image_size_px=84)
    assert info["image_tokens"] == 2 * 9 and info["text_tokens"] == 80 - 18 and info["vision_patches"] == 2 * 36
    with torch.no_grad():
        feats = tiny.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    emitted = sum(f.shape[0] for f in feats)
    assert emitted == int((batch["input_ids"] == tiny.config.image_token_id).sum()) == 2 * info["image_tokens"]
    out = tiny(**batch)  # transformers itself checks placeholders against features here
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == (2, 80)


def test_a_vlm_cell_without_images_is_all_text(tiny):
    batch, info = _batch(tiny, image_count=0)
    assert "pixel_values" not in batch and (info["image_tokens"], info["text_tokens"]) == (0, 80)
    assert (batch["position_ids"] == torch.arange(80)).all()
    assert torch.isfinite(tiny(**batch).loss)


def test_pixel_rows_are_what_the_conv3d_patch_embedding_sees(tiny):
    """The patch embedding applied to our rows equals the Conv3d applied to the image
    (both frames of the temporal patch), patch by patch, in merge-window order."""
    batch, _ = _batch(tiny, image_count=1, image_size_px=112)
    pe = tiny.model.visual.patch_embed
    size, p, m = 112, 14, 2
    from harness.cell.data_vlm import synthetic_images

    spec_seed = 0 * 100_003 + 0 + 7_919  # data_vlm's seed for the first step's images
    image = torch.from_numpy(synthetic_images(2, size, spec_seed)[0])
    with torch.no_grad():
        ours = pe(batch["pixel_values"][: (size // p) ** 2])
        full = torch.nn.functional.conv3d(torch.stack([image, image], dim=1)[None], pe.proj.weight, stride=(2, p, p))
    full = full[0, :, 0]  # [embed, rows, cols]
    per_row = size // (p * m)
    for r in range(ours.shape[0]):
        win, cell = divmod(r, m * m)
        py, px = (win // per_row) * m + cell // m, (win % per_row) * m + cell % m
        assert torch.allclose(ours[r], full[:, py, px], atol=1e-5), r


def test_positions_match_transformers_rope_index(tiny):
    batch, _ = _batch(tiny, image_count=3, image_size_px=56)
    kw = {"image_grid_thw": batch["image_grid_thw"]}
    params = inspect.signature(tiny.model.get_rope_index).parameters
    if "mm_token_type_ids" in params:  # transformers >= 5 asks for the token roles
        kw["mm_token_type_ids"] = (batch["input_ids"] == tiny.config.image_token_id).long()
    expected, _ = tiny.model.get_rope_index(batch["input_ids"], **kw)
    assert torch.equal(batch["position_ids"], expected)


def test_text_models_get_plain_token_batches():
    cfg = make_config(get_preset("tiny-llama"))
    built = inputs.build(CellSpec("tiny-llama", "fp32", 32), cfg, get_preset("tiny-llama"), 2)
    b = built.batches[0]
    assert set(b) == {"input_ids", "labels"} and b["input_ids"] is b["labels"] and b["input_ids"].shape == (1, 32)
    assert built.info == {"model_kind": "causal-lm", "text_tokens": 32, "image_tokens": 0, "image_count": 0,
                          "loss_tokens": 31}
    with pytest.raises(ValueError, match="takes no images"):
        inputs.build(CellSpec("tiny-llama", "fp32", 32, image_count=1), cfg, get_preset("tiny-llama"), 1)


def test_7b_preset_has_the_published_size_and_lora_stays_off_the_vision_tower():
    """Qwen2.5-VL-7B-Instruct has 8.29 B parameters: a 0.68 B vision tower and the 7.6 B
    Qwen2.5-7B language model. LoRA (all-linear) goes on the language model's 28 x 7
    projections by default; with include_vision also on the 32 blocks' 5 projections and
    the merger's 2 linear layers."""
    import peft

    preset = get_preset("qwen2.5-vl-7b")
    cfg = make_config(preset)
    with torch.device("meta"):
        model = _model_class(cfg).from_config(cfg, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.visual."))
    assert (total, vision) == (8_292_166_656, 676_550_144)
    for include_vision, n_lora in ((False, 196), (True, 196 + 32 * 5 + 2)):
        lcfg = peft.LoraConfig(r=4, target_modules="all-linear", exclude_modules=lora_exclude(preset, include_vision))
        wrapped = peft.get_peft_model(model, lcfg)
        names = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        assert len(names) == n_lora
        assert any(".visual." in n for n in names) == include_vision
        assert not any(n.endswith("lm_head") for n in names)
        model = wrapped.unload()
    assert lora_exclude(get_preset("tiny-llama")) is None and LoraSpec().include_vision is False
    assert np.isclose(vision / total, 0.0816, atol=1e-3)
