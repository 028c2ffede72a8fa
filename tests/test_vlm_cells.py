"""End to end on CPU: the tiny VLM runs every precision x every checkpointing mode through
``pytest suites/`` (worker processes, records), with the same proofs as text models; the
options that only make sense for VLMs are checked against the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cell.checkpointing import verify
from harness.core.axes import get_mode
from harness.cell.precision import verify_layers
from harness.core.record import RECORD_FIELDS
from harness.core.axes import GRAD_CKPT_MODES, PRECISIONS

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
# tiny-qwen2.5-vl: 2 vision blocks + 2 decoder layers; 12 linear layers in the vision tower,
# 14 in the language model, plus the output head. Default image: one of 112 px = 8 x 8
# patches of 14 px, merged 2 x 2 into 16 tokens.
VISION_BLOCKS, DECODER_LAYERS, VISION_LINEAR, LM_LINEAR = 2, 2, 12, 14


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vlm") / "run"
    proc = _run("-m", "pytest", "suites/", "-p", "no:cacheprovider", "-p", "no:benchmark", "--model", "tiny-qwen2.5-vl",
                "--device", "cpu", "--seq-len", "64", "--warmup-steps", "1", "--steps", "3", "--run-dir", str(run_dir))
    return proc, run_dir


def test_every_precision_and_checkpointing_mode_runs_on_the_tiny_vlm(vlm_run):
    proc, run_dir = vlm_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = len(PRECISIONS) * len(GRAD_CKPT_MODES)
    assert f"{n} passed" in proc.stdout
    recs = _records(run_dir)
    assert {(r["precision"], r["grad_ckpt"]) for r in recs} == {(p, g) for p in PRECISIONS for g in GRAD_CKPT_MODES}
    for r in recs:
        cid = r["cell_id"]
        assert r["status"] == "ok" and set(RECORD_FIELDS) <= set(r), (cid, r["error"])
        # seq_len = text + image tokens; the record says which were which
        assert (r["text_tokens"], r["image_tokens"], r["image_count"], r["image_size_px"]) == (48, 16, 1, 112), cid
        assert r["image_grid_thw"] == [1, 8, 8] and r["vision_patches"] == 64 and r["loss_tokens"] == 47
        assert r["tokens_per_s"] == pytest.approx(64 / r["step_time_s"])  # every token, image ones too
        losses = r["losses"]
        assert losses[-1] < losses[0], (cid, losses)
        # precision proof: the vision tower stays in 16-bit on purpose in quantised modes
        mode, layers = get_mode(r["precision"]), r["loaded_layers"]
        assert verify_layers(r["precision"], layers, compute_dtype="bfloat16") == [], cid
        assert layers["lora_layers"] == LM_LINEAR  # the language model's only, by default
        if mode.quant:
            assert layers["kept_unquantized"] == {"model.visual": VISION_LINEAR, "lm_head": 1}, cid
            assert layers["linear"]["dtypes"] == {"bfloat16": VISION_LINEAR + 1}
            kind = "linear4bit" if mode.quant == "4bit" else "linear8bit"
            assert layers[kind]["count"] == LM_LINEAR
        else:
            assert layers["linear"]["dtypes"] == {mode.weight_dtype: VISION_LINEAR + LM_LINEAR + 1}
        # checkpointing proof over vision blocks and decoder layers alike: each runs once
        # per forward pass and (on / offload) is recomputed once in the backward pass
        ev = r["grad_ckpt_evidence"]
        assert verify(r["grad_ckpt"], ev) == [] and ev["decoder_layers"] == VISION_BLOCKS + DECODER_LAYERS
        assert ev["layer_runs_forward"] == 4 * (VISION_BLOCKS + DECODER_LAYERS)
        assert ev["layer_recomputes"] == (0 if r["grad_ckpt"] == "off" else ev["layer_runs_forward"])
        assert ev["lora_params_with_grad"] == ev["lora_params"] == 2 * LM_LINEAR
        if r["grad_ckpt"] == "offload":
            width = {"fp32": 4}.get(r["precision"], 2)  # quantised modes compute in bf16
            # vision block inputs: 64 patches x 64 wide; decoder inputs: 64 tokens x 128
            per_step = VISION_BLOCKS * 64 * 64 * width + DECODER_LAYERS * 64 * 128 * width
            assert ev["offloaded_bytes"] == 4 * per_step, cid
        # the vision tower's FLOPs: blocks once per patch, merger once per image token,
        # forward only (it does not train)
        assert r["vision_matmul_params"] == 2 * 40_960 + 98_304
        assert r["vision_flops_per_step"] == 2 * (2 * 40_960 * 64 + 98_304 * 16)


def test_vision_lora_and_non_default_images(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run("-m", "pytest", "suites/", "-p", "no:cacheprovider", "-p", "no:benchmark", "--model", "tiny-qwen2.5-vl",
                "--device", "cpu", "--precision", "bf16,nf4", "--seq-len", "40", "--grad-ckpt", "off,offload",
                "--images", "2", "--image-size", "56", "--lora-vision", "--warmup-steps", "1", "--steps", "2",
                "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _records(run_dir)
    assert [r["cell_id"] for r in recs] == [f"tiny-qwen2.5-vl/{p}/s40/gc-{g}/img2/px56/lora-vision"
                                            for p in ("bf16", "nf4") for g in ("off", "offload")]
    for r in recs:
        assert r["status"] == "ok", r["error"]
        assert (r["image_count"], r["image_tokens"], r["text_tokens"]) == (2, 8, 32)
        layers, ev = r["loaded_layers"], r["grad_ckpt_evidence"]
        assert layers["lora_layers"] == LM_LINEAR + VISION_LINEAR
        # every LoRA matrix, the vision tower's included, got a gradient
        assert ev["lora_params_with_grad"] == ev["lora_params"] == 2 * (LM_LINEAR + VISION_LINEAR)
        assert r["vision_lora_matmul_params"] > 0 and r["lora_matmul_params"] > 0


def test_cells_accepts_vlm_and_text_models_together():
    p = _run("-m", "harness", "cells", "--model", "qwen2.5-vl-7b,llama-3.1-8b", "--precision", "bf16",
             "--seq-len", "2048", "--grad-ckpt", "on", "--image-size", "448")
    assert p.returncode == 2 and "llama-3.1-8b is a text-only model" in p.stderr  # images asked of a text model
    p = _run("-m", "harness", "cells", "--model", "qwen2.5-vl-7b,llama-3.1-8b", "--precision", "bf16",
             "--seq-len", "1024,2048", "--grad-ckpt", "on")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["qwen2.5-vl-7b/bf16/s1024/gc-on", "qwen2.5-vl-7b/bf16/s2048/gc-on",
                                "llama-3.1-8b/bf16/s1024/gc-on", "llama-3.1-8b/bf16/s2048/gc-on"]
    same = _run("-m", "harness", "cells", "--model", "qwen2.5-vl-7b", "--precision", "bf16", "--seq-len", "2048",
                "--grad-ckpt", "on", "--images", "1", "--image-size", "448")
    assert same.stdout.split() == ["qwen2.5-vl-7b/bf16/s2048/gc-on"]  # the defaults stay out of the id


@pytest.mark.parametrize("args, msg", [
    (("--model", "qwen2.5-vl-7b", "--seq-len", "256"), "cannot hold 1 image(s) of 448 px"),
    (("--model", "qwen2.5-vl-7b", "--seq-len", "2048", "--image-size", "450"), "not a multiple of 28"),
    (("--model", "tiny-llama", "--seq-len", "64", "--lora-vision"), "text-only model"),
    (("--model", "tiny-qwen2.5-vl", "--seq-len", "64", "--images", "-1"), "image count"),
])
def test_vlm_option_errors_are_one_line_and_exit_2(args, msg):
    p = _run("-m", "harness", "cells", "--precision", "bf16", "--grad-ckpt", "on", *args)
    assert p.returncode == 2, (args, p.stdout, p.stderr)
    assert p.stderr.startswith("lora-harness: error:") and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_opt_in_suites_do_not_build_cells_for_a_matrix_run():
    """`pytest suites/ --model tiny-qwen2.5-vl --seq-len 64` collects only the matrix: the
    compat / stability suites (not asked for) must not try to build their own cells for a
    model their default lengths do not suit (this once stopped an H200 run at collection)."""
    proc = _run("-m", "pytest", "suites/", "-p", "no:cacheprovider", "-p", "no:benchmark", "--model", "tiny-qwen2.5-vl",
                "--seq-len", "64", "--precision", "bf16", "--grad-ckpt", "off", "--collect-only", "-q")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "test_lora_cell[tiny-qwen2.5-vl/bf16/s64/gc-off]" in proc.stdout
    assert "test_compat" not in proc.stdout and "not-asked-for" not in proc.stdout
