"""--shard K/N: the split (harness.plan.shard), its estimates (harness.plan.shard_cost) and
the option's plumbing (harness.plan.shard_select, build_config). Pure and fast: no cell runs."""

import random
import re

import pytest

from harness.core.budget import GIB
from harness.core.errors import SpecError
from harness.plan.matrix import axes_for, expand
from harness.plan.options import build_config
from harness.plan.prune import pruned_by, pruned_record, row_key
from harness.plan.shard import ShardSpec, fingerprint, group_key, parse_shard, split
from harness.plan.shard_cost import History, estimator, token_model
from harness.plan.shard_select import default_run_dir, select

CPU = {"has_gpu": False}


def sweep(preset, models, *, budgets=(), **axes):
    cells = expand(axes_for(preset, models=list(models), **axes))
    if budgets:  # what --vram-budget does on a GPU host (apply_vram_budgets needs one)
        cells = [c.replace(vram_budget_bytes=int(b * GIB)) for c in cells for b in budgets]
    return cells


SWEEPS = {
    "smoke": sweep("smoke", ["tiny-llama"]),
    "smoke-batches": sweep("smoke", ["tiny-llama", "tiny-qwen2"], batch_size="1,4"),
    "default-world-sizes": sweep("default", ["llama-3.1-8b", "llama-3.2-1b"], world_size="1,2", parallel="ddp,fsdp"),
    "full-budgets": sweep("full", ["llama-3.1-8b", "mistral-7b-v0.3"], budgets=(24, 80)),
}


def assignment(sp):
    return {c.cell_id: k for k, cells in enumerate(sp.shards, 1) for c in cells}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_every_split_is_a_partition_of_whole_rows_balanced_and_deterministic(name):
    cells = SWEEPS[name]
    cost = token_model(cells)
    group_cost = {}  # what the split assigns: a row, with the torchrun rows of its cells
    for c in cells:
        group_cost[group_key(c)] = group_cost.get(group_key(c), 0.0) + cost(c)
    shuffled = list(cells)
    random.Random(7).shuffle(shuffled)
    for n in range(1, 9):
        sp = split(cells, n, cost)
        ids = [c.cell_id for s in sp.shards for c in s]
        assert len(sp.shards) == n and len(ids) == len(set(ids)) and set(ids) == {c.cell_id for c in cells}
        owner = assignment(sp)
        rows = {}
        for c in cells:
            rows.setdefault(row_key(c), set()).add(owner[c.cell_id])
        assert all(len(ks) == 1 for ks in rows.values()), "a row was split over shards"
        for c in cells:  # a torchrun cell runs where its one-GPU cell does (scaling efficiency)
            if c.world_size > 1:
                assert owner[c.cell_id] == owner[c.replace(world_size=1, parallel=None).cell_id]
        for s in sp.shards:  # the sweep's order inside a shard (rows short to long)
            assert [c.cell_id for c in s] == [c.cell_id for c in cells if owner[c.cell_id] == sp.shards.index(s) + 1]
        again = split(shuffled, n, cost)
        assert assignment(again) == owner and again.fingerprint == sp.fingerprint and again.digest == sp.digest
        assert max(sp.estimates) <= sum(sp.estimates) / n + max(group_cost.values()) + 1e-6
        assert sum(sp.estimates) == pytest.approx(sum(group_cost.values()))
    assert split(cells, 2, cost).fingerprint != split(cells, 3, cost).fingerprint


def test_more_shards_than_rows_leaves_some_empty():
    cells = sweep("smoke", ["tiny-llama"], precision="bf16", grad_ckpt="off,on")  # 2 rows
    sp = split(cells, 4, token_model(cells))
    assert sorted(len(s) for s in sp.shards) == [0, 0, 2, 2]


def simulate(cells, oom_from):
    """A sweep's records when a cell runs out of memory from length ``oom_from[row]`` on:
    pruning as harness.run.sweep applies it (pruned_by over the records so far)."""
    records = []
    for c in cells:
        cause = pruned_by(c, records)
        if cause:
            rec = dict(pruned_record(c, cause), cell_id=c.cell_id, spec=c.to_dict())
        else:
            status = "oom" if c.seq_len >= oom_from.get(row_key(c), 10 ** 9) else "ok"
            rec = {"cell_id": c.cell_id, "status": status, "spec": c.to_dict()}
        records.append(rec)
    return records


@pytest.mark.parametrize("name", list(SWEEPS))
def test_pruning_in_shards_is_the_serial_sweeps(name):
    cells = SWEEPS[name]
    rng = random.Random(name)
    lengths = sorted({c.seq_len for c in cells})
    oom_from = {row_key(c): rng.choice(lengths + [10 ** 9]) for c in cells}
    serial = {r["cell_id"]: (r["status"], bool(r.get("pruned"))) for r in simulate(cells, oom_from)}
    assert any(p for _, p in serial.values()), "the facts should prune something"
    for n in (2, 3, 5, 8):
        sharded = {}
        for part in split(cells, n, token_model(cells)).shards:
            sharded.update({r["cell_id"]: (r["status"], bool(r.get("pruned"))) for r in simulate(part, oom_from)})
        assert sharded == serial


def test_history_prices_cells_by_their_own_time_else_their_row_scaled_by_length():
    cells = sweep("smoke", ["tiny-llama"], precision="bf16", grad_ckpt="off,on", seq_len="64,256,1024")
    by_id = {c.cell_id: c for c in cells}
    recs = [{"cell_id": "tiny-llama/bf16/s64/gc-off", "status": "ok", "wall_time_s": 10.0,
             "spec": by_id["tiny-llama/bf16/s64/gc-off"].to_dict()},
            {"cell_id": "tiny-llama/bf16/s64/gc-off", "status": "ok", "wall_time_s": 30.0,
             "spec": by_id["tiny-llama/bf16/s64/gc-off"].to_dict()},
            {"cell_id": "tiny-llama/bf16/s256/gc-off", "status": "oom", "pruned": True, "wall_time_s": 0.0,
             "spec": by_id["tiny-llama/bf16/s256/gc-off"].to_dict()}]
    h = History(recs)
    assert h.seconds(by_id["tiny-llama/bf16/s64/gc-off"]) == 20.0  # median of the two
    assert h.seconds(by_id["tiny-llama/bf16/s1024/gc-off"]) == pytest.approx(20.0 * 1024 / 64)  # row, scaled
    assert h.seconds(by_id["tiny-llama/bf16/s64/gc-on"]) is None  # another row: the token model
    cost, basis = estimator(cells, h)
    assert basis.startswith("history (3 of 6 cells") and "token model scaled to seconds" in basis
    tokens = token_model(cells)
    known = [(by_id[f"tiny-llama/bf16/s{n}/gc-off"], 20.0 * n / 64) for n in (64, 256, 1024)]
    scale = sorted(t / tokens(c) for c, t in known)[1]  # the median ratio of the priced cells
    on = by_id["tiny-llama/bf16/s64/gc-on"]
    assert cost(on) == pytest.approx(tokens(on) * scale)
    _, none = estimator(cells, History([]))
    assert none.startswith("tokens (no cell")


def test_token_model_orders_cells_sensibly():
    cells = sweep("default", ["llama-3.1-8b", "llama-3.2-1b"])
    cost = token_model(cells)
    c = {x.cell_id: cost(x) for x in cells}
    assert c["llama-3.1-8b/bf16/s8192/gc-off"] > c["llama-3.1-8b/bf16/s512/gc-off"]
    assert c["llama-3.1-8b/fp32/s2048/gc-off"] > c["llama-3.1-8b/bf16/s2048/gc-off"]
    assert c["llama-3.1-8b/bf16/s2048/gc-on"] > c["llama-3.1-8b/bf16/s2048/gc-off"]
    assert c["llama-3.1-8b/bf16/s2048/gc-off"] > 3 * c["llama-3.2-1b/bf16/s2048/gc-off"]


@pytest.mark.parametrize("raw, env, want", [
    ("1/4", {}, (1, 4)), ("4/4", {}, (4, 4)), (" 2/3 ", {}, (2, 3)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, (1, 4)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (4, 4)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
              "SLURM_ARRAY_TASK_COUNT": "4"}, (4, 4)),  # --array=1-7:2
    ("auto/4", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    ("auto/3", {"JOB_COMPLETION_INDEX": "0"}, (1, 3)), ("auto/3", {"JOB_COMPLETION_INDEX": "2"}, (3, 3)),
])
def test_shard_option_and_scheduler_indexes(raw, env, want):
    spec = parse_shard(raw, env)
    assert (spec.index, spec.count) == want
    assert spec.suffix == f"shard{want[0]}of{want[1]}"
    assert parse_shard(None, env) is None and parse_shard("", env) is None


@pytest.mark.parametrize("raw, env, msg", [
    ("5/4", {}, "K must be between 1 and 4"), ("0/4", {}, "K must be between 1 and 4"),
    ("a/b", {}, "expected K/N"), ("2", {}, "expected K/N"), ("1/0", {}, "N must be at least 1"),
    ("2/4/1", {}, "expected K/N"),
    ("auto", {}, "no scheduler index in the environment"),
    ("auto", {"JOB_COMPLETION_INDEX": "1"}, "pass the Job's completions as --shard auto/N"),
    ("auto/3", {"JOB_COMPLETION_INDEX": "3"}, "outside 0..2"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT is not set"),
    ("auto/3", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, "the SLURM array has 4 tasks"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "not a whole number"),
])
def test_bad_shard_options_are_one_line_errors(raw, env, msg):
    with pytest.raises(SpecError, match=re.escape(msg)) as exc:
        parse_shard(raw, env)
    assert "\n" not in str(exc.value)


def test_build_config_runs_this_shards_cells_into_a_folder_of_its_own(tmp_path):
    base = {"device": "cpu", "precision": "bf16,fp32", "seq_len": "32,64"}
    whole = build_config(base, CPU)
    parts = [build_config(dict(base, shard=f"{k}/3"), CPU) for k in (1, 2, 3)]
    assert sorted(c.cell_id for p in parts for c in p.cells) == sorted(c.cell_id for c in whole.cells)
    assert whole.shard is None and whole.run_dir is None
    assert parts[1].run_dir.endswith("-shard2of3") and parts[1].shard.spec.label == "2/3"
    assert {p.shard.split.fingerprint for p in parts} == {fingerprint((c.cell_id for c in whole.cells), 3)}
    meta = parts[0].shard.to_json()
    assert meta["count"] == 3 and meta["cells_total"] == 12 and sum(len(s) for s in meta["split"]) == 12
    assert build_config(dict(base, shard="1/3", run_dir=str(tmp_path / "mine")), CPU).run_dir == str(tmp_path / "mine")
    with pytest.raises(SpecError, match="--shard-history only applies with --shard"):
        build_config(dict(base, shard_history=str(tmp_path)), CPU)
    with pytest.raises(SpecError, match="is not a run folder"):
        build_config(dict(base, shard="1/3", shard_history=str(tmp_path / "nope")), CPU)


def test_history_folders_steer_the_split(tmp_path):
    import json

    whole = build_config({"device": "cpu", "precision": "bf16,fp32", "seq_len": "32,64"}, CPU).cells
    run = tmp_path / "old" / "r1"
    run.mkdir(parents=True)
    # one row is very slow on this host: it gets a shard of its own
    lines = [{"cell_id": c.cell_id, "status": "ok", "spec": c.to_dict(),
              "wall_time_s": 100.0 if c.cell_id.startswith("tiny-llama/bf16/") and c.cell_id.endswith("/gc-off") else 1.0}
             for c in whole]
    (run / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    plan = select(whole, "1/2", str(tmp_path / "old"), env={})
    assert plan.split.basis == "history (12 of 12 cells from earlier runs)"
    assert [c.cell_id for c in plan.cells] == ["tiny-llama/bf16/s32/gc-off", "tiny-llama/bf16/s64/gc-off"]
    assert select(whole, "1/2", str(tmp_path / "old" / "*"), env={}).split.digest == plan.split.digest


def test_default_run_dir_and_resume_find_the_same_shard(tmp_path):
    plan = select(SWEEPS["smoke"], "2/4", None, env={})
    d = default_run_dir(plan, resume=False, base=tmp_path)
    assert d.startswith(str(tmp_path)) and d.endswith("-shard2of4")
    with pytest.raises(SpecError, match="no earlier run folder of shard 2/4"):
        default_run_dir(plan, resume=True, base=tmp_path)
    for name in ("20260101-000000-a-shard2of4", "20260101-000000-a-shard1of4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("")
    assert default_run_dir(plan, resume=True, base=tmp_path).endswith("a-shard2of4")
    assert ShardSpec(3, 8).label == "3/8"
