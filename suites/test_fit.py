"""Will it fit? The longest trainable context per VRAM budget, one test per (row, budget),
by real cells under emulated budgets (``harness.fit.search``). Rows are the sweep's model x
precision x checkpointing x batch (``--model --precision --grad-ckpt --batch-size``);
budgets come from ``--budgets``. A test passes when its answer is measured (a fitting
length with the next one confirmed to fail, ``OOM`` at the shortest, or the cap fitting)
and fails otherwise (a cell error, the ``--time-limit``). The run folder gets ``fit.md``,
``fit.json`` and ``fit.png``.

    pytest suites/test_fit.py --precision bf16,nf4 --grad-ckpt on,offload --budgets 16,24,40,80
"""

import pytest

from harness.fit import report as fitreport
from harness.fit import search as fitrun
from harness.core.budget import budget_label
from harness.plan.options import OPTIONS
from harness.core.errors import SpecError


def _values(config):
    return {o.dest: config.getoption(o.dest) for o in OPTIONS}


def pytest_generate_tests(metafunc):
    if "fit_case" not in metafunc.fixturenames:
        return
    from harness.pytest_plugin import harness_session

    s = harness_session(metafunc.config)
    values = _values(metafunc.config)
    if not values.get("lh_budgets"):
        metafunc.parametrize("fit_case", [pytest.param(None, marks=pytest.mark.skip(
            reason="no --budgets given (e.g. --budgets 16,24,40,80)"))], ids=["no-budgets"])
        return
    if not s.facts.get("has_gpu") or s.cfg.device == "cpu":
        metafunc.parametrize("fit_case", [pytest.param(None, marks=pytest.mark.skip(
            reason="needs a CUDA device: budgets are emulated on a real GPU"))], ids=["no-gpu"])
        return
    try:
        settings = fitrun.fit_settings(values, s.facts)
    except SpecError as exc:
        raise pytest.UsageError(f"lora-harness: {exc}") from None
    rows = fitrun.fit_rows(s.cfg.cells)
    cases = [(r, b) for b in settings.budgets_bytes for r in rows]  # smallest budget first, every row
    metafunc.parametrize("fit_case", cases, ids=[f"{r.model}/{r.precision}/gc-{r.grad_ckpt}"
                                                 + (f"/b{r.batch_size}" if r.batch_size != 1 else "")
                                                 + (f"/stack-{r.stack}" if r.stack != "hf" else "")
                                                 + ("/compile" if r.compile else "")
                                                 + f"/vram{budget_label(b)}" for r, b in cases])


@pytest.fixture(scope="module")
def fit_search(lora_harness):
    settings = fitrun.fit_settings(_values(lora_harness.pyconfig), lora_harness.facts)
    search = lora_harness.fit_search(settings)
    sweep = lora_harness.get_sweep()
    search.title = fitreport_title(lora_harness)
    yield search
    if search.answers:
        data = fitreport.write(search, sweep.store.dir, search.title)
        for line in fitreport.text(data).splitlines():
            lora_harness.out(line)
        lora_harness.out(f"fit.md / fit.json / fit.png in {sweep.store.dir}")


def fitreport_title(lora_harness):
    from harness.cli.fit import title_for

    return title_for(lora_harness.cfg.cells)


@pytest.mark.fit
def test_longest_context(fit_case, fit_search, lora_harness):
    row, budget = fit_case
    ans = fit_search.solve(row, budget)
    fitreport.write(fit_search, lora_harness.sweep.store.dir, fit_search.title)  # a killed run keeps its table
    if ans.status == "unsupported":
        pytest.skip(ans.message)
    assert ans.measured, f"{ans.row} at {budget_label(budget)}: {ans.status}: {ans.message}"
