"""The longest-context search against a fake cell oracle with a known threshold: exact
answers, few cells, reuse of records across budgets, and the report it writes."""

import json

import pytest

from harness.fit import rules as F
from harness.fit import report as fitreport
from harness.fit import search as fitrun
from harness.core.budget import GIB, MIB
from harness.core.spec import CellSpec
from tests.fakes import Oracle

ROW = CellSpec("llama-3.1-8b", "nf4", 2, "on", warmup_steps=1, steps=1)


def search(oracle, budgets, *, records=(), prior=(), gran=256, max_len=65536, **kw):
    settings = fitrun.FitSettings(tuple(budgets), gran, max_len, **kw)
    return fitrun.FitSearch(settings, measure=oracle, records=list(records), prior=list(prior), out=lambda s: None)


def test_exact_answers_without_any_prior_knowledge():
    o = Oracle()
    budgets = [12 * GIB, 16 * GIB, 24 * GIB, 40 * GIB]
    s = search(o, budgets)
    for b in budgets:
        ans = s.solve(ROW, b)
        assert ans.status == "found" and ans.measured
        assert ans.longest == o.threshold(b, s.grid(ROW)), (b / GIB, ans)
        assert ans.fit.seq_len == ans.longest and ans.fail.seq_len == ans.longest + 256
    # bisection over 256 grid lengths would need 8 cells a budget; the model (fitted on the
    # search's own cells) brings it to a handful
    assert len(o.calls) <= 3 * len(budgets) + 4, [c.cell_id for c in o.calls]
    assert all(c.vram_budget_bytes in budgets and c.cell_id.endswith("/fit") for c in o.calls)
    assert len({c.cell_id for c in o.calls}) == len(o.calls)  # never the same cell twice


def test_a_right_model_needs_two_cells_per_budget():
    """Prior records (another run, no budget) give the exact live-tensor model: each
    answer then costs the two cells that confirm it and nothing else. Prior records are
    for guesses only, never evidence."""
    o = Oracle()
    prior = [o.record(ROW.replace(seq_len=L, warmup_steps=2, steps=5), budget=None) for L in (512, 2048)]
    budgets = [16 * GIB, 24 * GIB, 40 * GIB]
    s = search(o, budgets, prior=prior)
    assert s.bracket(ROW, 16 * GIB).status == "open" and F.verdict(prior[0], 16 * GIB).fits
    for b in budgets:
        n0 = len(o.calls)
        ans = s.solve(ROW, b)
        assert ans.longest == o.threshold(b, s.grid(ROW))
        assert len(o.calls) - n0 == 2, [c.cell_id for c in o.calls[n0:]]


def test_oom_at_the_shortest_and_the_cap():
    o = Oracle(fixed=15 * GIB)
    s = search(o, [16 * GIB, 80 * GIB], max_len=8192)
    low = s.solve(ROW, 16 * GIB)
    assert low.status == "oom" and low.longest is None and low.fail.seq_len == 256 and low.measured
    high = s.solve(ROW, 80 * GIB)
    assert high.status == "at_cap" and high.longest == 8192 and high.measured
    assert fitreport.answer_text(low.status, low.longest, 8192) == "OOM"
    assert fitreport.answer_text(high.status, high.longest, 8192) == ">=8,192 (cap)"


def test_records_are_reused_across_budgets_and_runs():
    o = Oracle()
    s = search(o, [16 * GIB, 24 * GIB])
    a24 = s.solve(ROW, 24 * GIB)
    n = len(o.calls)
    # a second search over the same run folder runs nothing for 24 GiB...
    o2 = Oracle()
    s2 = search(o2, [24 * GIB], records=[o.record(c) for c in o.calls])
    assert s2.solve(ROW, 24 * GIB).longest == a24.longest and o2.calls == []
    # ...and 16 GiB starts from 24 GiB's failure (fails at 24 GiB => fails at 16 GiB)
    a16 = s.solve(ROW, 16 * GIB)
    assert a16.longest == o.threshold(16 * GIB, s.grid(ROW)) and len(o.calls) - n <= 3
    assert all(c.seq_len < a24.fail.seq_len for c in o.calls[n:])


def test_reuse_rule_for_unconstrained_records():
    o = Oracle()
    free = o.record(ROW.replace(seq_len=8192, warmup_steps=2, steps=5), budget=None)  # ran on the whole device
    nvml, alloc = free["peak_vram_bytes"], free["torch_peak_allocated_bytes"]
    big = F.verdict(free, nvml + F.REUSE_MARGIN_BYTES + GIB)
    assert big.fits and "never reach" in big.why
    small = F.verdict(free, int(alloc * 0.9))
    assert small is not None and not small.fits and "live tensors" in small.why
    assert F.verdict(free, nvml) is None  # in between: a cell under the budget must decide
    one_step = dict(free, spec=dict(free["spec"], warmup_steps=0, steps=1))
    assert F.verdict(one_step, nvml + 4 * GIB) is None  # one step never had the optimizer state
    oom = o.record(ROW.replace(seq_len=8192, vram_budget_bytes=20 * GIB))
    assert oom["status"] == "oom"
    assert not F.verdict(oom, 16 * GIB).fits and F.verdict(oom, 40 * GIB) is None and not F.verdict(oom, 20 * GIB).fits
    ok = o.record(ROW.replace(seq_len=1024, vram_budget_bytes=16 * GIB))
    assert F.verdict(ok, 24 * GIB).fits and "smaller budget" in F.verdict(ok, 24 * GIB).why


def test_next_probe_gallops_then_bisects():
    g = F.Grid(256, 65536)
    empty = F.bracket([], g)
    assert F.next_probe(empty, 4096, []) == 4096
    assert F.next_probe(empty, None, []) == F.DEFAULT_START
    assert F.next_probe(empty, 0, []) == 256  # predicted OOM: confirm at the shortest
    fit = lambda L: F.Observation(L, True, f"c{L}", "")  # noqa: E731
    fail = lambda L: F.Observation(L, False, f"c{L}", "")  # noqa: E731
    assert F.next_probe(F.bracket([fit(4096)], g), 4096, [(4096, True)]) == 4352
    assert F.next_probe(F.bracket([fit(4352)], g), 4096, [(4096, True), (4352, True)]) == 4864
    br = F.bracket([fit(4864), fail(6912)], g)
    assert F.next_probe(br, 4096, [(4096, True), (4352, True), (4864, True), (6912, False)]) == 5888
    assert F.bracket([fit(4096), fail(4352)], g).status == "found"
    assert F.next_probe(F.bracket([fit(4096), fail(4352)], g), 1, []) is None
    assert F.bracket([fit(5000), fail(4352)], g).status == "inconsistent"


def test_time_limit_and_errors_never_give_an_answer():
    clock = iter(range(0, 1000, 10))
    o = Oracle()
    s = fitrun.FitSearch(fitrun.FitSettings((24 * GIB,), 256, 65536, time_limit_s=15), measure=o,
                         out=lambda s: None, clock=lambda: next(clock))
    ans = s.solve(ROW, 24 * GIB)
    assert ans.status == "incomplete" and not ans.measured and "time limit" in ans.message

    def broken(cell):
        return {"cell_id": cell.cell_id, "spec": cell.to_dict(), "seq_len": cell.seq_len, "status": "crash",
                "error": "worker killed by SIGSEGV"}

    bad = search(broken, [24 * GIB]).solve(ROW, 24 * GIB)
    assert bad.status == "error" and not bad.measured and "SIGSEGV" in bad.message


def test_report_files(tmp_path):
    o = Oracle()
    s = search(o, [16 * GIB, 24 * GIB], max_len=32768)
    rows = [ROW, ROW.replace(precision="bf16", grad_ckpt="offload")]
    for b in (16 * GIB, 24 * GIB):
        for r in rows:
            s.solve(r, b)
    data = fitreport.write(s, tmp_path, "Will it fit? test")
    md = (tmp_path / "fit.md").read_text()
    assert "| VRAM budget | nf4 gc-on | bf16 gc-offload |" in md
    assert "(predicted)" in md and "not measured" in md.lower()
    stored = json.loads((tmp_path / "fit.json").read_text())
    assert stored["search"]["cells_run"] == len(o.calls) and stored["rows"][0]["answers"][0]["status"] == "found"
    assert stored["rows"][0]["budget_cells_ok"] == stored["rows"][0]["budget_cells_nvml_within"] > 0
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    txt = fitreport.text(data)
    assert "measured" in txt and "predictions (not measured)" in txt
    model = stored["rows"][0]["memory_model"]["torch_peak_allocated_bytes"]
    assert model["per_token_bytes"] == pytest.approx(2 * MIB) and model["fixed_bytes"] == pytest.approx(6 * GIB)
