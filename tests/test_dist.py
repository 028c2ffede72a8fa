"""Multi-GPU (torchrun) cells: the world_size / parallel axes, the capability
rules, how rank records merge into one record, the scaling efficiency, the 70B preset, and
real 2-process torchrun cells on the CPU (gloo backend) on the tiny model."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.core.spec import WindowSpec

from harness.plan import capability
from harness.run import torchrun as dist
from harness.plan.matrix import axes_for, expand
from harness.plan.options import build_config
from harness.core.spec import CellSpec
from harness.core.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
CPU_FACTS = {"has_gpu": False, "gpus": [], "bitsandbytes_installed": True}


# -- spec, ids, matrix, options ----------------------------------------------------------

def test_world_size_is_in_the_id_only_above_one():
    one = CellSpec("llama-3.1-8b", "bf16", 2048, "on")
    assert one.cell_id == "llama-3.1-8b/bf16/s2048/gc-on" and one.parallel is None
    two = one.replace(world_size=2)
    assert two.parallel == "ddp" and two.cell_id == "llama-3.1-8b/bf16/s2048/gc-on/ws2-ddp"
    assert one.replace(world_size=2, parallel="FSDP").cell_id.endswith("/ws2-fsdp")
    assert CellSpec.from_dict(two.to_dict()) == two
    # a record written before torchrun cells existed has neither field
    old = one.to_dict()
    del old["world_size"], old["parallel"]
    assert CellSpec.from_dict(old) == one


@pytest.mark.parametrize("kw, msg", [
    ({"world_size": 0}, "world size"),
    ({"parallel": "ddp"}, "needs world_size > 1"),
    ({"world_size": 2, "parallel": "zero3"}, "unknown parallel strategy"),
    ({"world_size": 2, "window": WindowSpec()}, "adaptive measured window is decided per process"),
])
def test_bad_distributed_specs(kw, msg):
    with pytest.raises(SpecError, match=msg):
        CellSpec("tiny-llama", "bf16", 64, **kw)


def test_matrix_axes_put_each_multi_gpu_cell_after_its_one_gpu_cell():
    cells = expand(axes_for("smoke", models=["tiny-llama"], precision="bf16", seq_len="128,64", grad_ckpt="on",
                            world_size="2,1", parallel="fsdp,ddp"))
    assert [c.cell_id for c in cells] == [
        "tiny-llama/bf16/s64/gc-on", "tiny-llama/bf16/s64/gc-on/ws2-fsdp", "tiny-llama/bf16/s64/gc-on/ws2-ddp",
        "tiny-llama/bf16/s128/gc-on", "tiny-llama/bf16/s128/gc-on/ws2-fsdp", "tiny-llama/bf16/s128/gc-on/ws2-ddp"]
    # the options, as the CLI and pytest give them
    cfg = build_config({"lh_precision": "bf16", "lh_seq_len": "64", "lh_grad_ckpt": "on", "lh_world_size": "2",
                        "lh_parallel": "ddp,fsdp"}, CPU_FACTS)
    assert [c.cell_id for c in cfg.cells] == ["tiny-llama/bf16/s64/gc-on/ws2-ddp", "tiny-llama/bf16/s64/gc-on/ws2-fsdp"]
    with pytest.raises(SpecError, match="--parallel"):
        build_config({"lh_world_size": "2", "lh_parallel": "tp"}, CPU_FACTS)
    # without the new options nothing changes
    assert all(c.world_size == 1 and c.parallel is None for c in build_config({}, CPU_FACTS).cells)


def test_capability_rules_for_torchrun_cells():
    h200 = {"name": "NVIDIA H200", "memory_total_bytes": 150_000_000_000}
    one_gpu = {"has_gpu": True, "use_gpu": True, "gpus": [h200], "bitsandbytes_installed": True}
    ws2 = CellSpec("llama-3.1-8b", "bf16", 2048, "on", world_size=2)
    v = capability.verdict(ws2, one_gpu)
    assert not v.supported and v.rule == "dist-gpus" and "needs 2 GPUs" in v.reason and "has 1" in v.reason
    assert capability.verdict(ws2, dict(one_gpu, gpus=[h200, h200])).supported
    assert capability.verdict(ws2, dict(CPU_FACTS, use_gpu=False)).supported  # CPU: gloo, any world size
    nf4 = capability.verdict(ws2.replace(precision="nf4", parallel="fsdp"), CPU_FACTS)
    assert nf4.rule == "fsdp-quantised" and "--parallel ddp" in nf4.reason
    assert capability.verdict(ws2.replace(precision="nf4"), CPU_FACTS).supported  # DDP of quantised models
    assert capability.verdict(ws2.replace(parallel="fsdp", load="pretrained"), CPU_FACTS).rule == "fsdp-load"
    assert capability.verdict(ws2.replace(vram_budget_bytes=24 << 30), CPU_FACTS).rule == "dist-budget"


def test_an_oom_prunes_longer_cells_of_its_own_world_size_only():
    from harness.plan.prune import pruned_by

    oom = CellSpec("llama-3.1-70b", "bf16", 512, "on")
    recs = [{"cell_id": oom.cell_id, "status": "oom", "spec": oom.to_dict()}]
    assert pruned_by(oom.replace(seq_len=2048), recs)["cell_id"] == oom.cell_id
    assert pruned_by(oom.replace(seq_len=2048, world_size=2, parallel="fsdp"), recs) is None


def test_launch_command_and_environment():
    cmd = dist.torchrun_command(2, "/x/job.json", python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                   "harness.cell.rank", "/x/job.json"]
    env = dist.launch_env({"NCCL_NVLS_ENABLE": "1", "PYTHONPATH": "/elsewhere"})
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]


# -- merging rank records (pure) ---------------------------------------------------------

def _rank(rank, *, status="ok", steps=(0.2, 0.3, 0.25), vram=10, error=None, checksum="abc"):
    return {"status": status, "error": error, "step_times_s": list(steps), "warmup_step_times_s": [1.0],
            "losses": [2.0 + rank, 1.0 + rank], "peak_vram_bytes": vram, "torch_peak_allocated_bytes": vram - 1,
            "torch_peak_reserved_bytes": vram, "peak_rss_bytes": 5, "energy_j": 3.0, "tokens_per_s": 1.0,
            "flops_per_token": 1e9, "peak_flops": 1e15, "device": "cuda", "device_name": "NVIDIA H200",
            "rank_facts": {"rank": rank, "nvml_index": rank, "nvml_uuid_match": True, "lora_checksum": checksum,
                           "backend": "cpu:gloo,cuda:nccl"}}


def _outcome(results, *, rc=0, timed_out=False, log="/nonexistent.log"):
    return dist.DistOutcome(results, rc, None, timed_out, 1.0, log, [])


def test_merge_takes_the_slowest_rank_per_step_and_the_largest_memory():
    cell = CellSpec("llama-3.1-8b", "bf16", 1000, "on", world_size=2)
    m = dist.merge_ranks(cell, _outcome({0: _rank(0, vram=10), 1: _rank(1, steps=(0.3, 0.2, 0.25), vram=12)}), 60)
    assert m["status"] == "ok" and m["error"] is None
    assert m["step_times_s"] == [0.3, 0.3, 0.25] and m["step_time_s"] == 0.3
    assert m["tokens_per_s"] == pytest.approx(2000 / 0.3) and m["per_gpu_tokens_per_s"] == pytest.approx(1000 / 0.3)
    assert m["peak_vram_bytes"] == 12 and m["per_rank_peak_vram_bytes"] == [10, 12]
    assert m["per_rank_torch_peak_allocated_bytes"] == [9, 11] and m["torch_peak_reserved_bytes"] == 12
    assert m["losses"] == [2.5, 1.5] and m["energy_j"] == 6.0
    assert m["energy_per_token_j"] == pytest.approx(6.0 / (2000 * 3))
    assert m["mfu"] == pytest.approx((1000 / 0.3) * 1e9 / 1e15)
    assert m["lora_in_sync"] is True and m["per_rank_nvml_index"] == [0, 1] and m["world_size"] == 2
    out_of_sync = dist.merge_ranks(cell, _outcome({0: _rank(0), 1: _rank(1, checksum="def")}), 60)
    assert out_of_sync["status"] == "error" and "differ between ranks" in out_of_sync["error"]


def test_merge_names_the_failure_of_the_right_rank():
    cell = CellSpec("llama-3.1-8b", "bf16", 1000, "on", world_size=2)
    peer = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1234"
    # an OOM on any rank is the cell's, whatever the other rank said
    m = dist.merge_ranks(cell, _outcome({0: _rank(0, status="error", error=peer),
                                         1: _rank(1, status="oom", error="CUDA out of memory")}, rc=1), 60)
    assert (m["status"], m["failed_rank"], m["tokens_per_s"]) == ("oom", 1, None)
    assert m["error"].startswith("rank 1: CUDA out of memory")
    # a rank that died without a record, its peer failing in a collective afterwards: a crash
    m = dist.merge_ranks(cell, _outcome({0: _rank(0, status="error", error=peer)}, rc=1), 60)
    assert (m["status"], m["failed_rank"]) == ("crash", 1) and "rank(s) 1 ended without a result" in m["error"]
    assert m["per_rank_status"] == ["error", None]
    # an error of its own wins over a missing rank (torchrun stopped the other one)
    m = dist.merge_ranks(cell, _outcome({1: _rank(1, status="error", error="ValueError: bug")}, rc=1), 60)
    assert (m["status"], m["error"]) == ("error", "rank 1: ValueError: bug")
    m = dist.merge_ranks(cell, _outcome({0: _rank(0)}, timed_out=True), 60)
    assert m["status"] == "timeout" and "60 s limit (1 of 2 ranks" in m["error"] and m["tokens_per_s"] is None
    m = dist.merge_ranks(cell, _outcome({}, rc=1), 60)
    assert m["status"] == "crash" and "rank(s) 0, 1" in m["error"]


def test_scaling_efficiency_needs_the_one_gpu_cell_of_the_run():
    cell = CellSpec("llama-3.1-8b", "bf16", 2048, "on", world_size=2)
    base = {"cell_id": "llama-3.1-8b/bf16/s2048/gc-on", "status": "ok", "tokens_per_s": 1000.0}
    f = dist.scaling_fields(cell, {"status": "ok", "tokens_per_s": 1800.0}, [base])
    assert f["scaling_efficiency"] == pytest.approx(0.9) and f["single_gpu_tokens_per_s"] == 1000.0
    assert f["scaling_baseline_cell"] == base["cell_id"] and f["scaling_efficiency_reason"] is None
    f = dist.scaling_fields(cell, {"status": "ok", "tokens_per_s": 1800.0}, [])
    assert f["scaling_efficiency"] is None and "--world-size 1,2" in f["scaling_efficiency_reason"]
    f = dist.scaling_fields(cell, {"status": "ok", "tokens_per_s": 1.0}, [dict(base, status="oom")])
    assert f["scaling_efficiency"] is None and "ended oom" in f["scaling_efficiency_reason"]


def test_70b_preset_on_the_meta_device():
    from harness.core.models import get_preset
    from harness.cell.build import parameter_count

    preset = get_preset("llama-3.1-70b")
    cfg = preset["config"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (8192, 80, 64, 8, 28672, 128256)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["max_position_embeddings"] == 131072
    assert parameter_count(preset) == 70_553_706_496  # the published 70.55 B


def test_a_checkpoint_larger_than_the_disk_is_unsupported(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from harness.core.models import get_preset
    from harness.cell.build import CheckpointTooLarge, check_disk_for_checkpoint

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(137 << 30, 10 << 30, 127 << 30))
    with pytest.raises(CheckpointTooLarge, match=r"llama-3.1-70b \(141 GB\) does not fit"):
        check_disk_for_checkpoint(get_preset("llama-3.1-70b"), tmp_path)
    assert check_disk_for_checkpoint(get_preset("tiny-llama"), tmp_path) > 0


# -- real torchrun cells on the CPU (gloo) -----------------------------------------------

def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """One sweep from the command line: the one-process cell, then DDP and FSDP on two ranks."""
    run_dir = tmp_path_factory.mktemp("dist") / "run"
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--device", "cpu", "--model", "tiny-llama",
                           "--precision", "bf16", "--seq-len", "64", "--grad-ckpt", "on", "--steps", "2",
                           "--world-size", "1,2", "--parallel", "ddp,fsdp", "--run-dir", str(run_dir),
                           "--cell-timeout", "240"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    recs = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()] \
        if (run_dir / "results.jsonl").is_file() else []
    return proc, run_dir, {r["cell_id"]: r for r in recs}


def test_two_rank_cells_run_and_record(dist_run):
    proc, run_dir, recs = dist_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base = recs["tiny-llama/bf16/s64/gc-on"]
    assert base["status"] == "ok" and "world_size" not in base  # one-process records keep their shape
    for strategy in ("ddp", "fsdp"):
        r = recs[f"tiny-llama/bf16/s64/gc-on/ws2-{strategy}"]
        assert r["status"] == "ok", r["error"]
        assert (r["world_size"], r["parallel"], r["launcher"], r["dist_backend"]) == (2, strategy, "torchrun", "gloo")
        for key in ("status", "peak_rss_bytes", "step_time_s", "tokens_per_s", "lora_checksum", "nvml_index"):
            assert len(r[f"per_rank_{key}"]) == 2, key
        assert r["per_rank_status"] == ["ok", "ok"]
        # LoRA gradients were synchronised: both ranks hold the same adapter after the steps
        assert r["lora_in_sync"] is True and len(set(r["per_rank_lora_checksum"])) == 1
        assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["step_time_s"])
        assert r["per_gpu_tokens_per_s"] == pytest.approx(r["tokens_per_s"] / 2)
        assert r["peak_rss_bytes"] == max(r["per_rank_peak_rss_bytes"])
        assert len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"])
        assert r["per_rank_losses"][0] != r["per_rank_losses"][1]  # each rank trained on its own batches
        assert r["scaling_baseline_cell"] == base["cell_id"]
        assert r["scaling_efficiency"] == pytest.approx(r["tokens_per_s"] / (2 * base["tokens_per_s"]))
        ev = r["grad_ckpt_evidence"]
        assert ev["layer_recomputes"] == ev["layer_runs_forward"] == 2 * 4 and ev["lora_params_with_grad"] == 28
        assert r["total_params"] == base["total_params"] and r["trainable_params"] == base["trainable_params"]
        log = (run_dir / r["log"]).read_text()
        assert "torch.distributed.run --standalone --nproc-per-node 2" in log and "NCCL_NVLS_ENABLE=0" in log
        assert "[rank 1] done" in log
    assert recs["tiny-llama/bf16/s64/gc-on/ws2-fsdp"]["load_path"] == "config-meta"
    assert recs["tiny-llama/bf16/s64/gc-on/ws2-ddp"]["ddp_options"] == {"gradient_as_bucket_view": True}
    assert "scaling efficiency" in proc.stdout
    assert not list((run_dir / "logs").glob("dist*"))  # rank files, pid files and job files are cleaned up


def _launch(tmp_path, monkeypatch, fail, timeout_s=120):
    cell = CellSpec("tiny-llama", "bf16", 64, "off", steps=2, world_size=2)
    log = tmp_path / "cell.log"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    out = dist.launch(cell, {"device": "cpu", "_test_fail_rank": fail}, timeout_s=timeout_s, log_path=log,
                      work_dir=tmp_path)
    return dist.merge_ranks(cell, out, timeout_s), time.monotonic() - t0, log.read_text()


@pytest.mark.parametrize("how, status", [("raise", "error"), ("kill", "crash")])
def test_a_failing_rank_ends_the_cell_without_hanging(tmp_path, monkeypatch, how, status):
    rec, wall, log = _launch(tmp_path, monkeypatch, {"rank": 1, "step": 1, "how": how})
    assert rec["status"] == status, rec["error"]
    assert rec["failed_rank"] == 1 and "rank" in rec["error"]
    if how == "raise":
        assert "injected failure on rank 1" in rec["error"] and rec["per_rank_status"][1] == "error"
    assert rec["tokens_per_s"] is None and rec["torchrun_exit_code"] not in (0, None)
    assert wall < 100  # the other rank did not wait for its collective's timeout (120 s)


def test_a_hanging_rank_is_killed_at_the_time_limit(tmp_path, monkeypatch):
    rec, wall, log = _launch(tmp_path, monkeypatch, {"rank": 1, "step": 0, "how": "hang"}, timeout_s=8)
    assert rec["status"] == "timeout" and "8 s limit" in rec["error"]
    assert wall < 8 + dist.GRACE_S + 15
    time.sleep(0.5)
    for pid in map(int, re.findall(r"\[rank \d\] pid (\d+)", log)):
        try:
            with open(f"/proc/{pid}/status") as f:
                state = next(line for line in f if line.startswith("State:"))
            assert "Z" in state, f"rank process {pid} still running"
        except FileNotFoundError:
            pass
