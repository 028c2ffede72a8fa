"""Loading run folders into DataFrames: merging hosts, retries, bad input."""

import math

import pytest

from harness.report import RunLoadError, load_run_set, load_runs
from tests.report_helpers import FIXTURES, H200, record, write_run


def test_one_row_per_cell_with_units_as_stored():
    cells = load_runs(FIXTURES / "cpu-mixed")
    assert len(cells) == 51 and cells["cell_id"].is_unique
    assert cells["status"].value_counts().to_dict() == {"ok": 35, "oom": 10, "unsupported": 3, "error": 1,
                                                        "timeout": 1, "crash": 1}
    row = cells.set_index("cell_id").loc["tiny-llama/bf16/s1024/gc-off"]
    assert row["peak_rss_bytes"] > 100 * 2 ** 20  # bytes, not GiB
    assert 0 < row["step_time_s"] < 5  # seconds
    assert row["memory_kind"] == "RSS" and row["memory_bytes"] == row["peak_rss_bytes"]
    assert row["device_label"] == "CPU (vm)"


def test_retries_keep_the_last_record_and_count_attempts():
    rs = load_run_set([FIXTURES / "cpu-mixed"])
    cells = rs.cells.set_index("cell_id")
    retried = cells.loc["tiny-llama/nf4/s64/gc-on"]  # a crafted crash, then the real ok record
    assert retried["status"] == "ok" and retried["attempts"] == 2
    assert cells.loc["tiny-llama/bf16/s256/gc-off", "attempts"] == 2
    assert len(rs.records) == 53  # every record stays available to the comparison


def test_runs_from_two_hosts_merge_with_the_device_as_a_column():
    cells = load_runs([FIXTURES / "cpu-mixed", H200])
    assert len(cells) == 51 + 27
    by_dev = cells.groupby("device_label")["cell_id"].count().to_dict()
    assert by_dev == {"CPU (vm)": 51, "NVIDIA H200": 27}
    gpu = cells[cells["device_label"] == "NVIDIA H200"]
    assert (gpu["memory_kind"] == "VRAM").all() and (gpu["memory_bytes"] == gpu["peak_vram_bytes"]).all()
    assert gpu["device_total_bytes"].iloc[0] == 150754820096


def test_truncated_last_line_is_a_warning_and_the_rest_loads():
    rs = load_run_set([FIXTURES / "truncated"])
    assert list(rs.cells["seq_len"]) == [64, 1024, 4096]
    assert any("line 4 is not valid JSON" in w for w in rs.warnings)
    with pytest.warns(UserWarning, match="not valid JSON"):
        load_runs(FIXTURES / "truncated")


def test_older_schema_loads_with_a_warning_and_blank_fields():
    rs = load_run_set([FIXTURES / "old-schema"])
    assert len(rs.cells) == 3 and (rs.cells["schema_version"] == 0).all()
    assert any("no schema version (older than 1)" in w for w in rs.warnings)
    assert any("1 record(s) without a cell id" in w for w in rs.warnings)
    assert rs.cells["mfu"].isna().all() and rs.cells["step_time_spread"].isna().all()
    assert (rs.cells["tokens_per_s"] > 0).all()


def test_empty_missing_and_non_run_folders_are_one_line_errors(tmp_path):
    with pytest.raises(RunLoadError, match="no usable records"):
        load_run_set([FIXTURES / "empty"])
    with pytest.raises(RunLoadError, match="no such run folder"):
        load_run_set([tmp_path / "nope"])
    with pytest.raises(RunLoadError, match="not a run folder"):
        load_run_set([tmp_path])
    # an empty run next to a usable one: a warning, and the usable one loads
    rs = load_run_set([FIXTURES / "empty", FIXTURES / "truncated"])
    assert len(rs.cells) == 3 and any("holds no usable records" in w for w in rs.warnings)


def test_non_finite_strings_become_nan(tmp_path):
    rec = record("m/bf16/s64/gc-off", mfu="nan", losses=[1.0, "nan", "inf"])
    cells = load_runs(write_run(tmp_path / "r", [rec]))
    assert math.isnan(cells["mfu"].iloc[0])
    assert cells["losses"].iloc[0] == [1.0, None, None]


def test_harness_exposes_load_runs_without_importing_pandas_eagerly():
    import subprocess
    import sys

    code = ("import sys, harness; assert 'pandas' not in sys.modules; "
            f"df = harness.load_runs({str(H200)!r}); print(len(df), df['device_label'].iloc[0])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(H200.parent.parent.parent))
    assert p.returncode == 0 and p.stdout.strip() == "27 NVIDIA H200", p.stderr
