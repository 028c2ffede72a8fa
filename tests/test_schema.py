"""The record schema (harness.core.schema): the derived lists, the generated document,
reading older and newer records, and a field declared in the schema alone reaching the
store, the report and compare."""

import json
from pathlib import Path

import pandas as pd
import pytest

from harness.core import schema, schema_doc
from harness.core.record import RECORD_FIELDS, make_record
from harness.core.store import RunStore, load_records
from harness.report import compare as cmp_mod
from harness.report import load, tables, units
from harness.report.compare_md import to_markdown
from tests.report_helpers import record, write_run

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"model": "tiny-llama", "precision": "bf16", "seq_len": 64, "grad_ckpt": "off", "batch_size": 1}


def test_the_generated_document_is_current():
    """docs/results-schema.md is generated: change the schema, then regenerate it."""
    committed = (ROOT / "docs" / "results-schema.md").read_text()
    assert committed == schema_doc.markdown(), "run: python -m harness.core.schema_doc > docs/results-schema.md"


def test_every_field_is_documented_with_its_group_and_unit():
    doc = schema_doc.markdown()
    for f in schema.fields():
        assert f.doc and f"`{f.name}`" in doc, f.name
    assert "schema_version 2" in doc and "## Multi-GPU cells" in doc and "## Phase timers" in doc


def test_the_lists_that_used_to_be_kept_by_hand_derive_from_the_schema():
    assert RECORD_FIELDS[:5] == ("schema_version", "run_id", "cell_id", "status", "error") and "spec" in RECORD_FIELDS
    assert load.AXES == ("model", "precision", "seq_len", "batch_size", "grad_ckpt", "stack")
    assert set(load.LIST_FIELDS) == {"step_times_s", "warmup_step_times_s", "losses"}
    assert {"peak_vram_bytes", "wall_time_s", "scaler_skipped_steps", "phase_measured_s"} <= set(load.NUMERIC_FIELDS)
    assert cmp_mod.STEP_METRICS == ("step_time_s", "tokens_per_s", "mfu")
    assert {"worker_pid", "exit_code", "seq_len", "schema_version", "record_index"} <= cmp_mod.NOT_METRICS
    assert {"tokens_per_s", "peak_vram_bytes", "memory_bytes", "fixed_cost_s"} <= cmp_mod.KNOWN_METRICS
    assert not cmp_mod.KNOWN_METRICS & cmp_mod.NOT_METRICS
    assert schema.bench_fields()[:3] == ("cell_id", "status", "error") and "gpu_index" in schema.bench_fields()
    assert units.fmt("peak_vram_bytes", 2 * 1024 ** 3) == "2.00 GiB" and units.fmt("step_time_p90_s", 0.25) == "250.0 ms"
    assert units.fmt("per_gpu_tokens_per_s", 1234.4) == "1,234 tokens/s"  # a tokens/s field whose name ends in _s
    assert units.fmt("ram_total_bytes", 1024 ** 3) == "1.00 GiB"  # a name outside the record: its suffix


def test_torchrun_merge_fields_are_declared():
    from harness.run import torchrun

    for f in torchrun.PER_RANK_FIELDS:
        assert schema.get(f"per_rank_{f}") is not None and schema.get(f) is not None, f
    for f in torchrun.MAX_FIELDS:
        assert schema.get(f).unit == "bytes", f


def test_upgrade_gives_an_old_spec_todays_defaults_and_leaves_the_input_alone():
    old_spec = {**SPEC, "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}}
    old = {"schema_version": 1, "cell_id": "c", "status": "ok", "spec": old_spec}
    new = schema.upgrade(old)
    assert new["spec"]["lora"]["input_cast"] is True and new["spec"]["window"] is None
    assert new["spec"]["world_size"] == 1 and new["spec"]["parallel"] is None
    assert set(RECORD_FIELDS) <= set(new) and new["schema_version"] == 1  # the version it was written in
    assert "input_cast" not in old["spec"]["lora"] and "run_id" not in old
    assert "suite" not in new and "warnings" not in new  # conditional fields stay absent
    crafted = schema.upgrade({"cell_id": "c", "status": "ok", "spec": {"steps": 3}})  # CellSpec cannot read it
    assert crafted["spec"] == {"steps": 3} and crafted["schema_version"] is None


def test_a_newer_record_is_kept_and_flagged_with_its_file_and_version(tmp_path):
    s = RunStore(tmp_path / "run")
    s.append(make_record(SPEC, "tiny-llama/bf16/s64/gc-off", "run", {"status": "ok"}))
    s.append({"schema_version": 99, "cell_id": "x", "status": "ok", "spec": {**SPEC, "from_the_future": 1}})
    with pytest.warns(UserWarning, match=r"results.jsonl: 1 of schema version 99: newer than this harness"):
        recs = load_records(s.results_path)
    assert [r["cell_id"] for r in recs] == ["tiny-llama/bf16/s64/gc-off", "x"]
    assert recs[1]["spec"]["from_the_future"] == 1 and "run_id" not in recs[1]  # read as it is
    with pytest.warns(UserWarning, match="schema version 99"):
        assert set(s.latest_by_cell()) == {"tiny-llama/bf16/s64/gc-off", "x"}
    rs = load.load_run_set([s.dir])
    assert len(rs.cells) == 2 and any("schema version 99" in w and str(s.results_path) in w for w in rs.warnings)


def test_a_field_added_later_is_one_entry():
    """What the settings fingerprint will be: one Field with since=2 reaches the record,
    the upgrade of older records and the document."""
    fp = schema.Field("fingerprint_example", "str", None, "identity", "a settings digest", since=2, always=True)
    with schema.registered(fp):
        assert "fingerprint_example" in make_record(SPEC, "c", "r", {"status": "ok"})
        assert schema.upgrade({"schema_version": 1, "cell_id": "c"})["fingerprint_example"] is None
        assert schema.upgrade({"schema_version": 2, "fingerprint_example": "ab"})["fingerprint_example"] == "ab"
        assert "| `fingerprint_example` | str |  | 2 |" in schema_doc.markdown()
    assert schema.get("fingerprint_example") is None


DUMMY = schema.Field("dummy_metric", "float", "s", "speed", "a metric only this test declares", metric=True,
                     better="lower", bench=True, table="dummy")


def test_a_metric_declared_in_the_schema_alone_reaches_store_report_and_compare(tmp_path):
    thresholds = cmp_mod.parse_thresholds(["dummy_metric:+5%"])
    empty = pd.DataFrame({"cell_id": []})
    with pytest.raises(cmp_mod.CompareError, match="unknown metric 'dummy_metric'"):
        cmp_mod.check_metrics(thresholds, empty)
    with schema.registered(DUMMY):
        cmp_mod.check_metrics(thresholds, empty)  # known from the schema, before any run holds it
        assert "dummy_metric" in schema.bench_fields() and units.fmt("dummy_metric", 1.25) == "1.2 s"
        # the store writes and reads it back
        store = RunStore(tmp_path / "store")
        store.append(make_record(SPEC, "tiny-llama/bf16/s64/gc-off", "store", {"status": "ok", "dummy_metric": 1.5}))
        assert store.records()[0]["dummy_metric"] == 1.5 and schema.undeclared(store.records()[0]) == []
        # the report frame holds it as a number ("nan" strings included) and the report shows it
        base = write_run(tmp_path / "base", [record("m/bf16/s512/gc-off", dummy_metric=1.0),
                                             record("m/bf16/s1024/gc-off", dummy_metric="nan")])
        cur = write_run(tmp_path / "cur", [record("m/bf16/s512/gc-off", dummy_metric=1.2),
                                           record("m/bf16/s1024/gc-off", dummy_metric=2.0)])
        b, c = load.load_run_set([base]), load.load_run_set([cur])
        assert "dummy_metric" in load.NUMERIC_FIELDS and pd.api.types.is_float_dtype(b.records["dummy_metric"])
        heads, rows = tables.more_metrics_table(c.cells)
        assert "dummy" in heads and {r[heads.index("dummy")] for r in rows} == {"1.2 s", "2.0 s"}
        from harness.report.build import build_report

        md = build_report([cur], tmp_path / "report", formats=("png",)).markdown.read_text()
        assert "### More metrics" in md and "| dummy |" in md.replace("---:", "")
        # compare judges it
        result = cmp_mod.compare(b.records, c.records, thresholds)
        got = {v.cell_id: v.verdict for v in result.metrics}
        assert got == {"m/bf16/s512/gc-off": "regression", "m/bf16/s1024/gc-off": "not measured"}
        assert "dummy_metric" in to_markdown(result, "base", "cur")
    assert schema.get("dummy_metric") is None and "dummy_metric" not in load.NUMERIC_FIELDS


def test_fields_reject_what_the_schema_cannot_mean():
    with pytest.raises(ValueError, match="type"):
        schema.Field("x", "number", None, "speed", "doc")
    with pytest.raises(ValueError, match="group"):
        schema.Field("x", "int", None, "misc", "doc")
    with pytest.raises(ValueError, match="metric must be a number"):
        schema.Field("x", "str", None, "speed", "doc", metric=True)
    with pytest.raises(ValueError, match="declared twice"):
        schema.register(schema.get("cell_id"))


def test_the_stored_records_of_the_reference_runs_are_declared():
    """Every key the harness wrote into the committed H200 runs is in the schema."""
    for results in sorted((ROOT / "reports" / "reference").glob("*/results.jsonl")):
        for line in results.read_text().splitlines():
            assert schema.undeclared(json.loads(line)) == [], results
