"""Real cells on CPU (tiny-llama, tiny-qwen2.5-vl, through the harness's Sweep): every key
their records hold is declared in the schema, so no field can appear undeclared."""

import pytest

from harness.core import host as env_mod
from harness.core import schema
from harness.core.record import make_record
from harness.plan.options import build_config
from harness.plan.prune import pruned_record
from harness.run import torchrun
from harness.run.sweep import Sweep


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    cfg = build_config({"model": "tiny-llama", "precision": "bf16", "seq_len": "64", "grad_ckpt": "on",
                        "steps": "2", "warmup_steps": 1, "device": "cpu", "run_dir": str(root / "run"),
                        "cache_dir": str(root / "cache")}, env_mod.quick_facts())
    text = cfg.cells[0]
    vlm = text.replace(model="tiny-qwen2.5-vl", grad_ckpt="off")
    broken = text.replace(lora=text.lora.__class__(target_modules="no_such_module"), tag="broken")
    with Sweep(cfg, env_mod.quick_facts(), out=lambda s: None) as sw:
        recs = {name: sw.run(c) for name, c in (("text", text), ("vlm", vlm), ("error", broken))}
        recs["resumed"] = dict(sw.store.latest_by_cell()[text.cell_id], resumed=True)
    return text, recs


def test_every_key_of_real_records_is_declared(records):
    _, recs = records
    assert recs["text"]["status"] == "ok" and recs["vlm"]["status"] == "ok", (recs["text"]["error"], recs["vlm"]["error"])
    assert recs["error"]["status"] == "error" and recs["error"].get("traceback")
    assert recs["vlm"]["model_kind"] == "vision-language" and recs["vlm"]["vision_patches"] > 0
    for name, rec in recs.items():
        assert schema.undeclared(rec) == [], name
        assert set(schema.record_fields()) <= set(rec), name


def test_records_the_sweep_writes_without_running_a_cell_are_declared(records):
    text, recs = records
    pruned = make_record(text.to_dict(), text.cell_id, "run", pruned_record(text, recs["text"]),
                         {"wall_time_s": 0.0})
    predicted = make_record(text.to_dict(), text.cell_id, "run",
                            {"status": "unsupported", "error": "no GPU", "predicted_unsupported": True})
    assert schema.undeclared(pruned) == [] and schema.undeclared(predicted) == []


def test_a_torchrun_record_merged_from_real_rank_records_is_declared(records, tmp_path):
    """Two ranks' records (the real cell's, with the facts a rank adds) merged as torchrun
    cells are: every per-rank and merged field is declared."""
    text, recs = records
    cell = text.replace(world_size=2, parallel="ddp")
    ranks = {r: dict(recs["text"], rank_facts={"rank": r, "local_rank": r, "pid": 100 + r, "nvml_index": None,
                                                "cuda_uuid": None, "nvml_uuid_match": None, "lora_checksum": "ab12",
                                                "backend": "gloo", "ddp_options": {"gradient_as_bucket_view": True}})
             for r in range(2)}
    out = torchrun.DistOutcome(rank_results=ranks, returncode=0, signal=None, timed_out=False, wall_s=1.0,
                               log_path=str(tmp_path / "log"), command=[])
    worker = torchrun.merge_ranks(cell, out, 60.0)
    extra = torchrun.scaling_fields(cell, worker, [recs["text"]])
    rec = make_record(cell.to_dict(), cell.cell_id, "run", worker, extra)
    assert rec["status"] == "ok" and rec["per_rank_lora_checksum"] == ["ab12", "ab12"]
    assert schema.undeclared(rec) == []
