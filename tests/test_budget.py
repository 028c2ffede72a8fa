"""VRAM budgets: parsing, ids, the allocator limit, the NVML rule, and user errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.budget import (GIB, MIB, BudgetError, allocator_limit_bytes, budget_label, parse_budgets, parse_size_bytes)
from harness.plan.budgets import check_against_device
from harness.plan.options import build_config
from harness.core.spec import CellSpec
from harness.core.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
H200 = {"has_gpu": True, "gpus": [{"name": "NVIDIA H200", "memory_total_bytes": 150754820096}],
        "gpu_name": "NVIDIA H200", "compute_capability": "9.0", "bitsandbytes_installed": True}
CPU = {"has_gpu": False, "gpus": [], "bitsandbytes_installed": True, "compute_capability": None}


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * GIB), ("24GB", 24 * 10 ** 9), ("24000MiB", 24000 * MIB), ("24", 24 * GIB),
    ("23.5 GiB", int(23.5 * GIB)), ("24gib", 24 * GIB), ("24G", 24 * GIB), ("80", 80 * GIB), (16, 16 * GIB),
    ("512MB", 512 * 10 ** 6), ("1TiB", 1024 * GIB),
])
def test_sizes(text, expected):
    assert parse_size_bytes(text) == expected


@pytest.mark.parametrize("text, msg", [
    ("lots", "is not a size"), ("24 gigs", "unknown unit"), ("GiB", "is not a size"), ("0", "not a positive"),
    ("-8GiB", "is not a size"), ("", "is not a size"), ("24XB", "unknown unit"),
])
def test_nonsense_sizes(text, msg):
    with pytest.raises(BudgetError, match=msg):
        parse_size_bytes(text)


def test_budget_lists_and_labels():
    assert parse_budgets("24,8, 16GiB,24") == [8 * GIB, 16 * GIB, 24 * GIB]
    assert parse_budgets(None) == []
    with pytest.raises(BudgetError, match="no size"):
        parse_budgets(" , ")
    assert [budget_label(b) for b in (24 * GIB, 24000 * MIB, 24 * 10 ** 9)] == ["24GiB", "24000MiB", "24000000000B"]
    assert issubclass(BudgetError, SpecError)  # the CLI's and pytest's one-line error path


def test_budget_against_the_device():
    check_against_device(80 * GIB, H200)
    with pytest.raises(BudgetError, match="larger than this GPU"):
        check_against_device(200 * GIB, H200)
    with pytest.raises(BudgetError, match="needs a CUDA device"):
        check_against_device(24 * GIB, CPU)


def test_allocator_limit():
    # budget - idle usage - memory outside the allocator - reserve
    assert allocator_limit_bytes(24 * GIB, baseline_bytes=GIB, non_allocator_bytes=GIB, reserve_bytes=GIB) == 21 * GIB
    assert allocator_limit_bytes(GIB, baseline_bytes=GIB, non_allocator_bytes=GIB) < 0


def test_cell_ids_carry_the_budget():
    c = CellSpec("llama-3.1-8b", "nf4", 2048, "on", vram_budget_bytes=24 * GIB)
    assert c.cell_id == "llama-3.1-8b/nf4/s2048/gc-on/vram24GiB"
    assert CellSpec.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.replace(vram_budget_bytes=None).cell_id == "llama-3.1-8b/nf4/s2048/gc-on"
    assert c.replace(tag="fit").cell_id.endswith("/vram24GiB/fit")
    with pytest.raises(SpecError, match="positive"):
        CellSpec("m", "bf16", 8, vram_budget_bytes=0)


def test_sweep_option_expands_budgets():
    cfg = build_config({"lh_vram_budget": "16,24GiB", "lh_precision": "bf16", "lh_seq_len": "512",
                        "lh_grad_ckpt": "on"}, H200)
    assert [c.cell_id for c in cfg.cells] == ["llama-3.1-8b/bf16/s512/gc-on/vram16GiB",
                                             "llama-3.1-8b/bf16/s512/gc-on/vram24GiB"]
    with pytest.raises(SpecError, match="larger than this GPU"):
        build_config({"lh_vram_budget": "160GiB"}, H200)
    with pytest.raises(SpecError, match="needs a CUDA device"):
        build_config({"lh_vram_budget": "24GiB"}, CPU)
    with pytest.raises(SpecError, match="needs a CUDA device"):  # a GPU host told to use the CPU
        build_config({"lh_vram_budget": "24GiB", "lh_device": "cpu"}, H200)


class _Guard:
    """BudgetGuard.finish without CUDA: the rule that decides a cell's fate from NVML."""

    @staticmethod
    def make(budget, limit=20 * GIB):
        from harness.cell.budget_guard import BudgetGuard

        g = BudgetGuard(budget, device=None, baseline_bytes=GIB)
        g.context_bytes, g.non_allocator_peak_bytes, g.total_bytes = GIB // 2, GIB, 140 * GIB
        g.limit_initial_bytes = g.limit_bytes = limit
        return g


def test_nvml_peak_over_budget_is_an_oom_even_when_torch_did_not_raise():
    out = {"status": "ok", "error": None, "peak_vram_bytes": 24 * GIB + 1, "torch_peak_reserved_bytes": 21 * GIB}
    _Guard.make(24 * GIB).finish(out)
    assert out["status"] == "oom" and out["budget_exceeded_outside_allocator"] is True
    assert "outside PyTorch's allocator" in out["error"] and out["nvml_peak_within_budget"] is False
    ok = {"status": "ok", "error": None, "peak_vram_bytes": 23 * GIB}
    _Guard.make(24 * GIB).finish(ok)
    assert ok["status"] == "ok" and ok["nvml_peak_within_budget"] is True and ok["vram_budget_bytes"] == 24 * GIB
    assert ok["budget_fraction"] == pytest.approx(20 / 140) and ok["cuda_context_bytes"] == GIB // 2
    free = {"status": "ok", "peak_vram_bytes": 100 * GIB}
    _Guard.make(None).finish(free)  # no budget: nothing to enforce
    assert free["status"] == "ok" and "vram_budget_bytes" not in free


def test_budget_cell_on_cpu_is_unsupported_in_the_worker():
    from harness.cell.train import run_cell

    out = run_cell(CellSpec("tiny-llama", "fp32", 16, vram_budget_bytes=GIB).to_dict(), {"device": "cpu"})
    assert out["status"] == "unsupported" and "needs a CUDA device" in out["error"]


def _run(*args, module="harness"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("args, msg", [
    (("run", "--vram-budget", "24GiB", "--precision", "bf16", "--seq-len", "8"), "needs a CUDA device"),
    (("run", "--vram-budget", "lots"), "is not a size"),
    (("cells", "--vram-budget", "24 gigs"), "unknown unit"),
    (("fit", "--budgets", "16,24"), "needs a CUDA device"),
    (("fit", "--budgets", "0", "--dry-run"), "not a positive size"),
    (("fit", "--dry-run"), "--budgets is required"),
    (("fit", "--budgets", "24", "--granularity", "0", "--dry-run"), "--granularity"),
    (("fit", "--budgets", "24", "--prior", "/nonexistent", "--dry-run"), "not a run folder"),
])
def test_cli_budget_errors_are_one_line_exit_2(args, msg):
    p = _run(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.startswith("lora-harness: error:") and msg in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_pytest_budget_error_is_a_usage_error(tmp_path):
    p = _run("suites/test_matrix.py", "-p", "no:cacheprovider", "--vram-budget", "24GiB", "--run-dir",
             str(tmp_path / "r"), module="pytest")
    assert p.returncode == 4 and "needs a CUDA device" in p.stderr + p.stdout
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_checkpoint_preparation_is_only_for_budget_cells_that_load_one(tmp_path):
    from harness.cell.budget_guard import prepare_checkpoint

    opts = {"cache_dir": str(tmp_path)}
    assert prepare_checkpoint(CellSpec("tiny-llama", "bf16", 16, vram_budget_bytes=GIB), opts) is False  # built from config
    # a quantised cell loads the synthetic checkpoint; without CUDA nothing is written here
    assert prepare_checkpoint(CellSpec("tiny-llama", "nf4", 16, vram_budget_bytes=GIB), opts) is False
    assert not any(tmp_path.iterdir())
