import json
import os

import pytest

from harness.core.store import RunStore, StoreError, latest_run, load_records


def test_append_and_read(tmp_path):
    s = RunStore(tmp_path / "run1")
    s.append({"cell_id": "a", "status": "ok"})
    s.append({"cell_id": "b", "status": "oom", "losses": [float("nan")]})
    recs = s.records()
    assert [r["cell_id"] for r in recs] == ["a", "b"]
    assert recs[1]["losses"] == ["nan"]
    assert (tmp_path / "run1" / "logs").is_dir()


def test_truncated_last_line_is_skipped_with_a_warning_and_append_continues(tmp_path):
    s = RunStore(tmp_path / "run")
    s.append({"cell_id": "a", "status": "ok"})
    with open(s.results_path, "a") as f:
        f.write('{"cell_id": "b", "sta')  # killed mid-write
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert [r["cell_id"] for r in s.records()] == ["a"]
    s.append({"cell_id": "c", "status": "ok"})
    with pytest.warns(UserWarning):
        assert [r["cell_id"] for r in load_records(s.results_path)] == ["a", "c"]


def test_latest_by_cell_keeps_the_last_record(tmp_path):
    s = RunStore(tmp_path / "run")
    s.append({"cell_id": "a", "status": "crash"})
    s.append({"cell_id": "a", "status": "ok"})
    assert s.latest_by_cell()["a"]["status"] == "ok"


def test_resume_opens_latest_run(tmp_path):
    base = tmp_path / "runs"
    with pytest.raises(StoreError, match="no earlier run"):
        RunStore.open(resume=True, base=base)
    a = RunStore(base / "a")
    a.append({"cell_id": "x", "status": "ok"})
    os.utime(a.results_path, (1, 1))
    b = RunStore(base / "b")
    b.append({"cell_id": "y", "status": "ok"})
    assert latest_run(base) == b.dir
    assert RunStore.open(resume=True, base=base).dir == b.dir
    assert RunStore.open(base=base).dir.parent == base


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot write the run folder"):
        RunStore(blocker / "run")


def test_write_json_is_atomic(tmp_path):
    s = RunStore(tmp_path / "r")
    s.write_json("env.json", {"a": 1})
    assert json.loads((tmp_path / "r" / "env.json").read_text()) == {"a": 1}
    assert s.read_json("missing.json") is None
