"""Data, FLOPs, capability rules, options and tables."""

import math

import numpy as np
import pytest

from harness.plan import capability
from harness.cell import data
from harness.core import flops
from harness.plan.options import build_config
from harness.core.spec import CellSpec
from harness.core.errors import SpecError
from harness.core.fmt import fmt_duration, fmt_gib, format_table, summary_rows

CPU = {"has_gpu": False, "gpus": [], "bitsandbytes_installed": True, "compute_capability": None}
T4 = {"has_gpu": True, "gpu_name": "Tesla T4", "compute_capability": "7.5", "bitsandbytes_installed": True}


def test_batches_are_deterministic_learnable_and_in_range():
    a = data.make_batches(1024, 128, 2, 3, seed=5)
    b = data.make_batches(1024, 128, 2, 3, seed=5)
    assert all((x == y).all() for x, y in zip(a, b))
    assert a[0].shape == (2, 128) and a[0].dtype == np.int64
    assert a[0].min() >= data.FIRST_TOKEN and a[0].max() < 1024
    succ = data.chain(1024, 0)
    x = a[0][0] - data.FIRST_TOKEN
    follows = np.mean(succ[x[:-1]] == x[1:])
    assert 0.8 < follows <= 1.0  # mostly the successor: learnable
    assert not (a[0] == a[1]).all()  # a fresh batch each step
    assert 0 < data.entropy_floor(1024) < math.log(1024)


def test_flops_formula_and_peaks():
    assert flops.train_flops_per_token(frozen_params=10, lora_params=1, n_layers=2, seq_len=3, attn_dim=4) == 40 + 6 + 288
    assert flops.peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
    assert flops.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756.5e12
    assert flops.peak_flops("Tesla T4", "bfloat16") is None
    assert flops.peak_flops("cpu", "float32") is None
    assert flops.mfu(1000.0, 1e9, None) is None
    assert flops.mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)


def test_capability_rules():
    facts = dict(T4, use_gpu=True)
    assert "compute capability" in capability.predict(CellSpec("m", "bf16", 8), facts)
    assert capability.predict(CellSpec("m", "fp16", 8), facts) is None
    assert capability.predict(CellSpec("m", "bf16", 8), dict(CPU, use_gpu=False)) is None
    nobnb = dict(CPU, bitsandbytes_installed=False)
    assert "bitsandbytes" in capability.predict(CellSpec("m", "nf4", 8), nobnb)
    assert "no NVIDIA GPU" in capability.predict(CellSpec("m", "fp32", 8), dict(CPU, device_pref="cuda"))


def test_options_defaults_follow_the_host():
    cpu = build_config({}, CPU)
    assert cpu.matrix == "smoke" and cpu.cells[0].model == "tiny-llama" and cpu.cell_timeout_s == 300
    gpu = build_config({}, T4)
    assert gpu.matrix == "default" and gpu.cells[0].model == "llama-3.1-8b" and len(gpu.cells) == 36
    forced = build_config({"device": "cpu"}, T4)
    assert forced.matrix == "smoke" and forced.cells[0].model == "tiny-llama"
    cfg = build_config({"lh_precision": "nf4", "lh_seq_len": "64", "lh_grad_ckpt": "on", "lh_lora_rank": 4,
                        "lh_lr": 0.01, "lh_nvml_period_ms": 2}, CPU)
    assert [c.cell_id for c in cfg.cells] == ["tiny-llama/nf4/s64/gc-on"]
    assert cfg.cells[0].lora.rank == 4 and cfg.cells[0].lr == 0.01 and cfg.nvml_period_s == 0.002


@pytest.mark.parametrize("values, msg", [
    ({"model": "llama-9000"}, "unknown model"),
    ({"model": "/nonexistent/ckpt"}, "not a Hugging Face checkpoint"),
    ({"device": "tpu"}, "--device"),
    ({"cell_timeout": 0}, "--cell-timeout"),
    ({"lora_rank": 0}, "rank"),
])
def test_option_errors(values, msg):
    with pytest.raises(SpecError, match=msg):
        build_config(values, CPU)


def test_local_checkpoint_model(tmp_path):
    ck = tmp_path / "my ckpt"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    cfg = build_config({"model": str(ck), "precision": "bf16", "seq_len": "8", "grad_ckpt": "off"}, CPU)
    c = cfg.cells[0]
    assert c.model == "local-my-ckpt" and c.model_path == str(ck.resolve())
    assert c.resolved_load() == "pretrained"


def test_tables():
    assert fmt_gib(2 * 1024 ** 3) == "2.00 GiB" and fmt_gib(None) == "-"
    assert fmt_duration(75) == "1m15s" and fmt_duration(3700) == "1h01m"
    rows = summary_rows([{"cell_id": "a", "status": "oom", "peak_vram_bytes": 1024 ** 3, "tokens_per_s": 5.0},
                         {"cell_id": "b", "status": "ok", "peak_vram_bytes": None, "peak_rss_bytes": 2 * 1024 ** 3,
                          "tokens_per_s": 1234.5}])
    assert rows == [["a", "OOM", "1.00 GiB VRAM", "-", ""], ["b", "ok", "2.00 GiB RSS", "1,234", ""]]
    assert format_table(["x", "y"], [["1", "2"]]).splitlines()[0].startswith("x")
