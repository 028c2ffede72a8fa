from harness.plan.prune import pruned_by, pruned_record
from harness.core.spec import CellSpec


def _rec(cell, status, **kw):
    return {"cell_id": cell.cell_id, "status": status, "spec": cell.to_dict(), **kw}


def test_longer_cell_of_the_same_row_is_pruned_by_a_measured_oom():
    short = CellSpec("m", "bf16", 2048, "off")
    recs = [_rec(short, "oom")]
    assert pruned_by(CellSpec("m", "bf16", 8192, "off"), recs)["cell_id"] == short.cell_id
    rec = pruned_record(CellSpec("m", "bf16", 8192, "off"), recs[0])
    assert rec["status"] == "oom" and rec["pruned"] and "m/bf16/s2048/gc-off" in rec["error"]


def test_other_rows_shorter_cells_and_pruned_records_do_not_prune():
    short = CellSpec("m", "bf16", 2048, "off")
    recs = [_rec(short, "oom")]
    assert pruned_by(CellSpec("m", "bf16", 1024, "off"), recs) is None  # shorter
    assert pruned_by(CellSpec("m", "bf16", 2048, "off"), recs) is None  # itself
    assert pruned_by(CellSpec("m", "bf16", 8192, "on"), recs) is None  # other mode
    assert pruned_by(CellSpec("m", "nf4", 8192, "off"), recs) is None  # other precision
    assert pruned_by(CellSpec("m", "bf16", 8192, "off", batch_size=2), recs) is None
    assert pruned_by(CellSpec("m", "bf16", 8192, "off", lr=1.0), recs) is None  # other settings
    assert pruned_by(CellSpec("m", "bf16", 8192, "off"), [_rec(short, "ok")]) is None
    assert pruned_by(CellSpec("m", "bf16", 8192, "off"), [_rec(short, "oom", pruned=True)]) is None
    assert pruned_by(CellSpec("m", "bf16", 8192, "off"), [{"status": "oom", "spec": {"bogus": 1}}]) is None
