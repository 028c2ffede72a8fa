"""Comparison verdicts on crafted regressions, improvements and noise."""

import pytest

from harness.report.compare import CompareError, compare, parse_threshold, parse_thresholds
from harness.report.load import load_run_set
from harness.report.compare_md import summary_line, to_markdown
from tests.report_helpers import record, write_run

STEADY = (0.100, 0.101, 0.099, 0.100, 0.102)  # 2% spread
NOISY = (0.080, 0.160, 0.100, 0.120, 0.090)  # 80% spread
T = parse_thresholds(["tokens_per_s:-5%", "peak_vram_bytes:+3%"])


def frames(tmp_path, base, cur):
    b = load_run_set([write_run(tmp_path / "base", base)]).records
    c = load_run_set([write_run(tmp_path / "cur", cur)]).records
    return b, c


def verdicts(cmp, metric):
    return {v.cell_id: v.verdict for v in cmp.metrics if v.threshold.metric == metric}


def test_threshold_syntax():
    t = parse_threshold("tokens_per_s:-5%")
    assert (t.metric, t.direction, t.amount, t.relative) == ("tokens_per_s", -1, 0.05, True)
    t = parse_threshold(" mfu : +0.02 ")
    assert (t.metric, t.direction, t.amount, t.relative) == ("mfu", 1, 0.02, False)
    with pytest.raises(CompareError, match="say which way is worse"):
        parse_threshold("tokens_per_s:5%")
    with pytest.raises(CompareError, match="is not METRIC"):
        parse_threshold("tokens_per_s")
    assert len(parse_thresholds(["a:+1%,b:-2%", "c:+3"])) == 3


def test_regression_improvement_noise_and_ok(tmp_path):
    slower = tuple(t * 1.25 for t in STEADY)  # -20% tokens/s, far outside a 2% spread
    faster = tuple(t * 0.8 for t in STEADY)
    base = [record("m/bf16/s512/gc-off", steps=STEADY), record("m/bf16/s1024/gc-off", steps=STEADY),
            record("m/bf16/s2048/gc-off", steps=NOISY), record("m/bf16/s4096/gc-off", steps=STEADY)]
    cur = [record("m/bf16/s512/gc-off", steps=slower), record("m/bf16/s1024/gc-off", steps=faster),
           # 20% slower in the median, but inside the baseline's own per-step spread
           record("m/bf16/s2048/gc-off", steps=tuple(t * 1.2 for t in NOISY)),
           record("m/bf16/s4096/gc-off", steps=tuple(t * 1.02 for t in STEADY))]
    cmp = compare(*frames(tmp_path, base, cur), T)
    # a change in a cell whose steps disagree is unstable: neither a pass nor a regression
    assert verdicts(cmp, "tokens_per_s") == {"m/bf16/s512/gc-off": "regression", "m/bf16/s1024/gc-off": "improved",
                                             "m/bf16/s2048/gc-off": "unstable", "m/bf16/s4096/gc-off": "ok"}
    reg = next(v for v in cmp.metrics if v.verdict == "regression")
    assert reg.change_rel == pytest.approx(1 / 1.25 - 1)
    unstable = next(v for v in cmp.metrics if v.verdict == "unstable")
    assert "measured steps spread" in unstable.note and "cannot tell" in unstable.note
    assert cmp.regressed and summary_line(cmp).startswith("REGRESSION: 1 metric regression(s)")


def test_memory_is_judged_by_the_threshold_alone(tmp_path):
    base = [record("m/nf4/s512/gc-on", vram_gib=20.0), record("m/nf4/s1024/gc-on", vram_gib=20.0)]
    cur = [record("m/nf4/s512/gc-on", vram_gib=20.8), record("m/nf4/s1024/gc-on", vram_gib=20.4)]  # +4%, +2%
    cmp = compare(*frames(tmp_path, base, cur), T)
    assert verdicts(cmp, "peak_vram_bytes") == {"m/nf4/s512/gc-on": "regression", "m/nf4/s1024/gc-on": "ok"}
    reg = next(v for v in cmp.metrics if v.verdict == "regression")
    assert reg.note == "single measurement each side: threshold only"


def test_several_baseline_records_give_memory_a_spread(tmp_path):
    # the same cell in two baseline runs at 20.0 and 22.0 GiB (median 21): 21.8 GiB is
    # +3.8%, past the threshold but inside what the baseline itself measured
    b1 = write_run(tmp_path / "b1", [record("m/nf4/s512/gc-on", vram_gib=20.0)])
    b2 = write_run(tmp_path / "b2", [record("m/nf4/s512/gc-on", vram_gib=22.0)])
    cur = write_run(tmp_path / "c", [record("m/nf4/s512/gc-on", vram_gib=21.8)])
    base = load_run_set([b1, b2]).records
    cmp = compare(base, load_run_set([cur]).records, parse_thresholds(["peak_vram_bytes:+3%"]))
    (v,) = cmp.metrics
    assert v.baseline.value == pytest.approx(21 * 2 ** 30) and v.verdict == "noise"
    cur2 = write_run(tmp_path / "c2", [record("m/nf4/s512/gc-on", vram_gib=22.5)])
    (v,) = compare(base, load_run_set([cur2]).records, parse_thresholds(["peak_vram_bytes:+3%"])).metrics
    assert v.verdict == "regression"


def test_status_changes_added_and_removed_cells(tmp_path):
    base = [record("m/bf16/s512/gc-off"), record("m/bf16/s8192/gc-off", "oom"), record("m/int8/s512/gc-off"),
            record("m/nf4/s512/gc-off", "oom"), record("m/fp32/s512/gc-off")]
    cur = [record("m/bf16/s512/gc-off", "oom"),  # ok -> OOM: regression
           record("m/bf16/s8192/gc-off"),  # OOM -> ok: improvement
           record("m/int8/s512/gc-off", "crash"),  # ok -> failure: regression
           record("m/nf4/s512/gc-off", "unsupported"),  # OOM -> unsupported: a change, not worse
           record("m/fp4/s512/gc-off")]  # added; fp32 removed
    b, c = frames(tmp_path, base, cur)
    cmp = compare(b, c, T, allow_missing=True)
    got = {(v.cell_id, v.kind): v.verdict for v in cmp.cells}
    assert got == {("m/bf16/s512/gc-off", "status"): "regression", ("m/bf16/s8192/gc-off", "status"): "improved",
                   ("m/int8/s512/gc-off", "status"): "regression", ("m/nf4/s512/gc-off", "status"): "changed",
                   ("m/fp4/s512/gc-off", "added"): "listed", ("m/fp32/s512/gc-off", "removed"): "listed"}
    assert not cmp.metrics  # no cell finished on both sides
    assert "no cell finished (ok) on both sides: only statuses were compared" in cmp.warnings
    strict = compare(b, c, T)
    assert {v.cell_id for v in strict.regressions} == {"m/bf16/s512/gc-off", "m/int8/s512/gc-off",
                                                        "m/fp32/s512/gc-off"}


def test_retries_use_the_last_status_and_pool_measurements(tmp_path):
    base = [record("m/bf16/s512/gc-off", steps=STEADY)]
    cur = [record("m/bf16/s512/gc-off", "crash", timestamp="2026-12-01T10:00:00+0000"),
           record("m/bf16/s512/gc-off", steps=STEADY, timestamp="2026-12-01T11:00:00+0000")]
    cmp = compare(*frames(tmp_path, base, cur), T)
    assert not cmp.cells and verdicts(cmp, "tokens_per_s") == {"m/bf16/s512/gc-off": "ok"}


def test_unusable_comparisons(tmp_path):
    b, c = frames(tmp_path, [record("m/bf16/s512/gc-off")], [record("other/bf16/s512/gc-off")])
    with pytest.raises(CompareError, match="no cell in common"):
        compare(b, c, T)
    with pytest.raises(CompareError, match="unknown metric 'tokens_per_sec'"):
        compare(b, b, parse_thresholds(["tokens_per_sec:-5%"]))


def test_a_threshold_no_cell_could_check_is_reported_unchecked(tmp_path):
    cpu = [record("m/bf16/s512/gc-off", device="cpu")]
    cmp = compare(*frames(tmp_path, cpu, cpu), T)
    assert verdicts(cmp, "peak_vram_bytes") == {"m/bf16/s512/gc-off": "not measured"}
    assert [t.metric for t in cmp.unchecked()] == ["peak_vram_bytes"] and not cmp.regressed


def test_markdown_report(tmp_path):
    base = [record("m/bf16/s512/gc-off", steps=STEADY), record("m/bf16/s1024/gc-off"), record("m/fp32/s64/gc-off")]
    cur = [record("m/bf16/s512/gc-off", steps=tuple(t * 1.25 for t in STEADY)), record("m/bf16/s1024/gc-off", "oom")]
    cmp = compare(*frames(tmp_path, base, cur), T)
    md = to_markdown(cmp, "base run", "current run")
    assert md.startswith("# Regression report\n\n**REGRESSION: 1 metric regression(s) and 2 cell status regression(s)")
    assert "| m/bf16/s512/gc-off | tokens_per_s | 5,120 tokens/s | 4,096 tokens/s | -20.0% | REGRESSION |" in md
    assert "| m/bf16/s1024/gc-off | status | ok | OOM | REGRESSION |" in md
    assert "| m/fp32/s64/gc-off | removed | ok | - | REGRESSION | not in the current run |" in md
    assert "peak_vram_bytes: a rise of more than 3% is a regression" in md
