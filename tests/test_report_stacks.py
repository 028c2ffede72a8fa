"""The training stack as a report dimension, on crafted H200-like records: the stack-vs-stack
table and its vendor-claim verdicts, the stack column, the comparison chart, compare
matching cells by id (the stack included), fit.md's row labels."""

import json
import statistics

import pytest

from harness.core.spec import CellSpec
from harness.fit.search import row_label
from harness.report import stacks
from harness.report.build import build_report
from harness.report.compare import compare, parse_thresholds
from harness.report.load import load_run_set
from tests.report_helpers import GIB, write_run

STEADY = (0.100, 0.101, 0.099, 0.100, 0.102)


def rec(precision, seq_len, stack="hf", *, speed=1.0, vram_gib=40.0, steps=STEADY, losses=(3.0, 2.5, 2.0), seed=0):
    """A schema-2 record of llama-3.1-8b at ``seq_len`` tokens, gc-on, on ``stack``; ``speed``
    divides the step times (2.0: twice hf's tokens/s)."""
    spec = CellSpec("llama-3.1-8b", precision, seq_len, grad_ckpt="on", stack=stack, seed=seed)
    times = [t * seq_len / 2048 / speed for t in steps]
    med = statistics.median(times)
    return {"schema_version": 2, "run_id": "crafted", "cell_id": spec.cell_id, "status": "ok", "error": None,
            "model": spec.model, "precision": precision, "seq_len": seq_len, "batch_size": 1, "grad_ckpt": "on",
            "stack": stack, "device": "cuda", "device_name": "NVIDIA H200", "memory_metric": "vram",
            "timestamp": "2026-12-06T10:00:00+0000", "step_times_s": times, "step_time_s": med,
            "tokens_per_s": seq_len / med, "step_time_spread": (max(times) - min(times)) / med,
            "peak_vram_bytes": int(vram_gib * GIB), "peak_rss_bytes": 2 * GIB, "losses": list(losses),
            "spec": spec.to_dict()}


@pytest.fixture()
def run(tmp_path):
    records = [
        rec("bf16", 2048), rec("bf16", 2048, "liger", speed=1.05, vram_gib=30.0, losses=(3.0, 2.5, 2.01)),
        rec("bf16", 2048, "unsloth", speed=2.5, vram_gib=11.0, losses=(3.0, 2.52, 2.02)),
        rec("nf4-dq", 2048, vram_gib=20.0, losses=(3.01, 2.51, 2.02)),
        # noisy steps: a 2x claim cannot be told from these
        rec("nf4-dq", 2048, "unsloth", speed=2.0, vram_gib=5.8, steps=(0.05, 0.1, 0.07, 0.06, 0.09)),
        rec("bf16", 8192), rec("bf16", 8192, "liger", speed=1.2, vram_gib=12.0),
    ]
    folder = write_run(tmp_path / "run", records)
    fit = {"rows": [{"row": "bf16 gc-on", "model": "llama-3.1-8b", "precision": "bf16", "grad_ckpt": "on",
                     "batch_size": 1, "max_seq_len": 32768,
                     "answers": [{"budget_bytes": 24 * GIB, "status": "found", "longest": 8192}]},
                    {"row": "bf16 gc-on unsloth", "model": "llama-3.1-8b", "precision": "bf16", "grad_ckpt": "on",
                     "stack": "unsloth", "batch_size": 1, "max_seq_len": 32768,
                     "answers": [{"budget_bytes": 24 * GIB, "status": "at_cap", "longest": 32768}]}]}
    (folder / "fit.json").write_text(json.dumps(fit))
    return folder


def _rows(folder):
    rs = load_run_set([folder])
    from harness.report.build import fit_rows

    heads, rows = stacks.table(rs.cells, fit_rows(rs))
    return rs, [dict(zip(heads, r)) | {"_verdict": r[-1], "_vs": r[6], "_mem": r[8], "_fit": r[10]} for r in rows]



def test_the_stack_table_compares_each_cell_with_its_hf_cell_and_judges_the_claims(run):
    _rs, rows = _rows(run)
    by = {(r["precision"], r["tokens"], r["stack"]): r for r in rows}
    assert [k for k in by] == [("bf16", "2,048", "hf"), ("bf16", "2,048", "liger"), ("bf16", "2,048", "unsloth"),
                               ("bf16", "8,192", "hf"), ("bf16", "8,192", "liger"), ("nf4-dq", "2,048", "hf"),
                               ("nf4-dq", "2,048", "unsloth")]
    hf = by[("bf16", "2,048", "hf")]
    assert hf["_vs"] == "x1.00" and hf["_mem"] == "=" and hf["vendor claim"] == "-"
    assert hf["loss vs hf bf16 (mean |diff|)"] == "reference" and hf["longest at 24 GiB"] == "8,192"
    uns = by[("bf16", "2,048", "unsloth")]
    assert uns["_vs"] == "x2.50" and uns["_mem"] == "-72%" and uns["longest at 24 GiB"] == ">=32,768 (cap)"
    assert uns["longest vs hf"] == "-"  # a capped answer is no ratio
    assert uns["_verdict"].startswith("speed: confirms (steps x2.") and "memory: confirms (72% less)" in uns["_verdict"]
    liger = by[("bf16", "2,048", "liger")]
    assert liger["_verdict"].startswith("speed: does not confirm") and "memory: does not confirm (25% less)" in \
        liger["_verdict"]
    noisy = by[("nf4-dq", "2,048", "unsloth")]
    assert noisy["_verdict"].startswith("speed: cannot tell") and "unstable steps" in noisy["_verdict"]
    assert "memory: confirms (71% less)" in noisy["_verdict"]
    # loss against the hf bf16 cell of the same length and seed, step by step
    assert liger["loss vs hf bf16 (mean |diff|)"] == "0.0033 (0.13%)"
    assert by[("nf4-dq", "2,048", "hf")]["loss vs hf bf16 (mean |diff|)"].startswith("0.0133")
    inside = by[("bf16", "8,192", "liger")]["_verdict"]
    assert inside.startswith("speed: cannot tell (steps x1.1") and "x1.2 is inside the noise" in inside


def test_verdicts_inside_the_noise_and_the_claims_quoted_with_sources(run):
    rs, _ = _rows(run)
    hf, uns = (rs.cells[rs.cells["cell_id"] == c].iloc[0] for c in ("llama-3.1-8b/nf4-dq/s2048/gc-on",
                                                                     "llama-3.1-8b/nf4-dq/s2048/gc-on/stack-unsloth"))
    assert stacks.memory_verdict(0.70, uns.replace({uns["memory_bytes"]: 6.1 * GIB}), hf) == \
        ("cannot tell", "70% less, within 2% of the claim")
    assert stacks.memory_verdict(0.70, uns, uns)[0] == "does not confirm"
    heads, rows = stacks.claims_table(rs.cells)
    claims = {r[0]: r for r in rows}
    assert "2× faster with 70% less VRAM" in claims["unsloth"][1] and "github.com/unslothai/unsloth" in \
        claims["unsloth"][2]
    assert "training throughput by 20% and reduces memory usage by 60%" in claims["liger"][1]
    assert "github.com/linkedin/Liger-Kernel" in claims["liger"][2]
    assert claims["liger"][4] == "confirms: 1, does not confirm: 2, cannot tell: 1"


def test_the_report_shows_the_stack_as_a_dimension(run, tmp_path):
    files = build_report([run], tmp_path / "report", formats=("svg",), embed=False)
    md = files.markdown.read_text()
    assert "## Training stacks compared" in md and "does not confirm" in md
    assert "| stack | cell | status | tokens/s |" in md  # the stack column of the speed table
    svg = [p for p in files.charts if p.name.startswith("stacks--")]
    assert len(svg) == 1 and "hf" in md
    text = svg[0].read_text()
    for st in ("hf", "liger", "unsloth"):
        assert f"series-tps-bf16-on-{st}" in text and f"series-mem-bf16-on-{st}" in text
    # the per-group charts keep one stack per line: a chart set per stack
    assert any(p.name.startswith("throughput--") and "stack-liger" in p.name for p in files.charts)


def test_compare_matches_cells_by_id_so_a_stack_is_compared_with_itself(run, tmp_path):
    base = load_run_set([run]).records
    faster_liger = [rec("bf16", 2048, "liger", speed=1.5, vram_gib=30.0)]
    cur = load_run_set([write_run(tmp_path / "cur", faster_liger)]).records
    cmp = compare(base, cur, parse_thresholds(["tokens_per_s:-5%"]))
    v = [m for m in cmp.metrics if m.threshold.metric == "tokens_per_s"]
    assert [m.cell_id for m in v] == ["llama-3.1-8b/bf16/s2048/gc-on/stack-liger"]
    assert v[0].verdict == "improved"  # against liger's 1.05x, not hf's cell


def test_fit_rows_are_labelled_with_their_stack():
    row = CellSpec("llama-3.1-8b", "nf4-dq", 2048, grad_ckpt="on")
    assert row_label(row) == "nf4-dq gc-on"
    assert row_label(row.replace(stack="unsloth")) == "nf4-dq gc-on unsloth"
    assert row_label(row.replace(stack="liger", compile=True, attn_implementation="eager")) == \
        "nf4-dq gc-on liger compiled attn-eager"
