"""pytest plugin: ``pytest suites/`` runs the matrix, one test per cell.

Thin: options come from ``harness.plan.options``, cells from ``harness.plan.matrix``, running and
recording from ``harness.run.sweep``, and the test outcome from ``harness.core.record.outcome_for``
(the one mapping: ok -> pass, oom -> xfail, or fail with ``--fail-on-oom``,
unsupported -> skip, error / crash / timeout -> fail).

A suite asks for the ``lora_cell`` parameter and the ``lora_harness`` fixture::

    def test_cell(lora_cell, lora_harness, lora_benchmark):
        lora_harness.check(lora_harness.run(lora_cell, lora_benchmark))
"""

from __future__ import annotations

from collections import Counter

import pytest

from harness.core.fmt import SUMMARY_HEADERS, format_table, summary_rows
from harness.core.spec import CellSpec
from harness.plan.options import OPTIONS
from harness.pytest_session import OPT_IN_SUITES, SUITE_PARAMS, HarnessSession, asked_suites

_KEY = pytest.StashKey[HarnessSession]()
# pytest-benchmark's options that ask for its output; without one its table is not shown
BENCHMARK_OUTPUT = ("benchmark_json", "benchmark_save", "benchmark_autosave", "benchmark_compare",
                    "benchmark_histogram", "benchmark_enable", "benchmark_only")


def harness_session(config: pytest.Config) -> HarnessSession:
    """This pytest session's harness (what the ``lora_harness`` fixture returns), for
    hooks in suites that run before fixtures exist (``pytest_generate_tests``)."""
    return config.stash[_KEY]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lora-harness", "LoRA harness matrix (see README)")
    for o in OPTIONS:
        if o.kind == "flag":
            group.addoption(f"--{o.name}", dest=o.dest, action="store_true", default=False, help=o.help)
        else:
            typ = {"int": int, "float": float}.get(o.kind, str)
            group.addoption(f"--{o.name}", dest=o.dest, type=typ, default=None, help=o.help)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_KEY] = HarnessSession(config)
    # The harness's own table is the summary; pytest-benchmark's (one round per cell,
    # 220 columns wide) only where its output was asked for. Runs before its session is set up.
    if config.pluginmanager.hasplugin("benchmark") and not any(
            _given(config, name) for name in BENCHMARK_OUTPUT):
        config.option.benchmark_disable = True
    # Validate the options now: a bad one is one clear line and exit code 4, before
    # collection, not a collection error with a traceback.
    if any(config.getoption(o.dest) not in (None, False) for o in OPTIONS):
        config.stash[_KEY].cfg  # noqa: B018 - raises pytest.UsageError
    if config.getoption("lh_baseline"):  # load the baseline before anything runs: a typo costs seconds
        from harness.report import gate as regress

        try:
            config.stash[_KEY].baseline = regress.from_options(config.stash[_KEY].cfg.options)
        except regress.BaselineError as exc:
            raise pytest.UsageError(f"lora-harness: --baseline: {exc}") from None
    # the suites' own options are checked the same way
    if any(config.getoption(o.dest) is not None for o in OPTIONS if o.name.startswith(("compat-", "stability-"))):
        for suite in SUITE_PARAMS.values():
            config.stash[_KEY].suite_cells(suite)
    config.addinivalue_line("markers", "matrix: a LoRA training cell of the precision x length x checkpointing matrix")
    config.addinivalue_line("markers", "compat: the compatibility suite (every precision x checkpointing mode, "
                                       "attempted whatever the rules predict)")
    config.addinivalue_line("markers", "stability: the training stability suite (loss curves per precision vs fp32)")


def _given(config: pytest.Config, name: str) -> bool:
    try:
        return bool(config.getoption(name))
    except ValueError:
        return False


@pytest.hookimpl(wrapper=True)
def pytest_report_teststatus(report, config: pytest.Config):
    """No progress letter for a cell's test: the harness prints a line per cell, and the
    counts at the end still come from pytest."""
    res = yield
    if res and report.nodeid in harness_session(config).cell_nodeids and config.getoption("verbose") <= 0:
        category, _letter, word = res
        return category, "", word
    return res


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = harness_session(config)
    f = s.facts
    if f["has_gpu"] and (config.getoption("lh_device") or "auto") != "cpu":
        where = f"GPU host: {f['gpu_name']} (compute capability {f['compute_capability']})"
    elif f["has_gpu"]:
        where = f"GPU host, but --device cpu: cells run on the CPU"
    else:
        where = "no GPU found: cells run on the CPU (tiny model by default; memory is peak RSS, not VRAM)"
    return [f"lora-harness: {where}"] + ([f"lora-harness: {s.cfg.shard.describe()}"] if config.getoption("lh_shard") else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lora_cell" in metafunc.fixturenames:
        cells = list(harness_session(metafunc.config).cfg.cells)
        metafunc.parametrize("lora_cell", cells, ids=[c.cell_id for c in cells])
    # compat / stability suites
    s = harness_session(metafunc.config)
    marks = {m.name for m in metafunc.definition.iter_markers()} & set(OPT_IN_SUITES)
    if marks and not marks & asked_suites(metafunc.config):
        # Not asked for: pytest_collection_modifyitems deselects it. Build none of its
        # cells (the matrix's options, e.g. a VLM --model, need not suit that suite).
        for param in (*SUITE_PARAMS, "compat_group"):
            if param in metafunc.fixturenames:
                metafunc.parametrize(param, [None], ids=["not-asked-for"])
        return
    for param, suite in SUITE_PARAMS.items():
        if param in metafunc.fixturenames:
            cells = list(s.suite_cells(suite))
            metafunc.parametrize(param, cells, ids=[c.cell_id for c in cells])
    if "compat_group" in metafunc.fixturenames:
        from harness.report.compat import group_id

        keys = list(dict.fromkeys(group_id(c.model, c.precision, c.resolved_load()) for c in s.suite_cells("compat")))
        metafunc.parametrize("compat_group", keys, ids=keys)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    asked = asked_suites(config)
    keep, drop = [], []
    for item in items:
        marks = {m.name for m in item.iter_markers()} & set(OPT_IN_SUITES)
        (drop if marks and not marks & asked else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    s = harness_session(session.config)
    items = [i for i in session.items if "lora_cell" in getattr(i, "fixturenames", ())]
    items = items if not items or s.cfg.cells else []  # an empty --shard: pytest's skip item, no run folder
    suite_items = [i for i in session.items if set(SUITE_PARAMS) & set(getattr(i, "fixturenames", ()))]
    s.n_items = len(items) + len(suite_items)
    s.cell_nodeids = {i.nodeid for i in (*items, *suite_items)}
    if (items or suite_items) and not session.config.option.collectonly:
        sweep = s.get_sweep()
        sweep.total = s.n_items
        cfg = s.cfg
        what = []
        if items:
            models = ", ".join(dict.fromkeys(c.model for c in cfg.cells))
            what.append(f"{len(items)} cells of the {cfg.matrix} matrix ({models})")
        if suite_items:
            what.append(f"{len(suite_items)} compatibility / stability cells")
        s.out(f"lora-harness: {'; '.join(what)}; run folder {sweep.store.dir}{' (resuming)' if cfg.resume else ''}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """With --gpus (or --ray), run the selected cells over the GPUs before the first test;
    each test then reports its cell's record (harness.run.pool, harness.run.remote;
    docs/decisions.md says why not xdist). Returns None, so pytest's own loop then runs the tests as usual."""
    s = harness_session(session.config)
    spread = session.config.getoption("lh_gpus") or session.config.getoption("lh_ray")
    if not spread or session.config.option.collectonly or session.testsfailed:
        return None
    jobs = []
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if isinstance(params.get("lora_cell"), CellSpec):
            jobs.append((params["lora_cell"], None, False))
        for param, suite in SUITE_PARAMS.items():
            if isinstance(params.get(param), CellSpec):
                jobs.append((params[param], suite, suite == "compat"))
    if jobs:
        sweep = s.get_sweep()
        recs = sweep.prerun(jobs)
        for cell, suite, _ in jobs:
            if suite and cell.cell_id in recs:
                s.suite_records.setdefault(cell.cell_id, recs[cell.cell_id])
    return None


@pytest.fixture(scope="session")
def lora_harness(request: pytest.FixtureRequest) -> HarnessSession:
    return harness_session(request.config)


@pytest.fixture
def lora_benchmark(request: pytest.FixtureRequest):
    """pytest-benchmark's ``benchmark`` fixture, or None where that plugin is disabled."""
    if request.config.pluginmanager.hasplugin("benchmark"):
        return request.getfixturevalue("benchmark")
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    """The compatibility and stability tables, in pytest's summary."""
    for table in harness_session(config).suite_tables:
        terminalreporter.section(table.splitlines()[0].lstrip("# "))
        terminalreporter.write_line("\n".join(table.splitlines()[2:]).rstrip())


def _final_summary(config: pytest.Config) -> None:
    """The session's answer, as the last thing it prints (after pytest's counts): every
    cell's status, peak and tokens/s, the baseline verdict, and the next command."""
    s = harness_session(config)
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if s.sweep is None or not s.sweep.records or tr is None:
        return
    recs = s.sweep.records
    tr.section("lora-harness results")
    tr.write_line(format_table(SUMMARY_HEADERS, summary_rows(recs)))
    counts = Counter(r["status"] for r in recs)  # in order of first appearance
    tr.write_line("")
    tr.write_line(", ".join(f"{n} {st}" for st, n in counts.items())
                  + f" (OOM cells show as xfailed in pytest's counts{'; --fail-on-oom makes them fail' if not s.cfg.fail_on_oom else ''})")
    if s.nothing_ran:
        tr.write_line(f"lora-harness: no cell could run on this host: {s.nothing_ran}", red=True, bold=True)
    if s.baseline_verdict is not None:
        tr.write_line("")
        for line in s.baseline_verdict.lines:
            tr.write_line(line, red=s.baseline_verdict.failed, bold=s.baseline_verdict.failed)
    tr.write_line(f"results: {s.sweep.store.dir / 'results.jsonl'}")
    tr.write_line(f"next: lora-harness report {s.sweep.store.dir}   (charts, tables and report.html; "
                  "python -m harness works too)", bold=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the last cell: the compatibility and stability tables go into the run folder;
    a session in which no cell could run fails (a GPU job on a host without the GPU, a
    stack without its package: nothing was measured); with --baseline, this session's
    cells are compared and the session fails on a regression or an unstable change."""
    s = harness_session(session.config)
    s.suite_tables = s.write_suite_reports()
    if s.sweep is None or not s.sweep.records:
        return
    s.nothing_ran = _nothing_ran(s.sweep.records)
    if s.nothing_ran and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if s.baseline is None:
        return
    from harness.report.gate import check_sweep

    s.baseline_verdict = check_sweep(s.baseline, s.sweep.store.dir, [r["cell_id"] for r in s.sweep.records])
    if s.baseline_verdict.failed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _nothing_ran(records) -> str:
    """Why no cell of a sweep could run ('' when some cell ran)."""
    if any(r.get("status") != "unsupported" for r in records):
        return ""
    reasons = Counter(str(r.get("error") or "no reason").splitlines()[0] for r in records)
    top, n = reasons.most_common(1)[0]
    return f"all {len(records)} cells unsupported ({n}: {top})"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _KEY in config.stash:
        _final_summary(config)
        harness_session(config).close()
