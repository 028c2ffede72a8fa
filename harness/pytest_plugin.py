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

import sys
from collections import Counter
from typing import Any

import pytest

from harness.core import host as env_mod
from harness.core import schema
from harness.plan.options import OPTIONS, SweepConfig, build_config
from harness.core.record import outcome_for
from harness.core.spec import CellSpec
from harness.core.errors import SpecError
from harness.core.store import StoreError
from harness.core.fmt import SUMMARY_HEADERS, format_table, summary_rows

_KEY = pytest.StashKey["HarnessSession"]() if hasattr(pytest, "StashKey") else None


class HarnessSession:
    """Per pytest session: the sweep configuration, the running sweep, the records."""

    def __init__(self, config: pytest.Config) -> None:
        self.pyconfig = config
        self._facts: dict[str, Any] | None = None
        self._cfg: SweepConfig | None = None
        self.sweep = None
        self.n_items = 0
        self.baseline = None  # issue 3: harness.report.gate.BaselineCheck with --baseline
        self.baseline_verdict = None
        self._suite_cells: dict[str, tuple[CellSpec, ...]] = {}  # issue 4: compat / stability
        self.suite_records: dict[str, dict[str, Any]] = {}
        self.suite_tables: list[str] = []
        self.loading: dict[str, Any] | None = None

    @property
    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = env_mod.quick_facts()
        return self._facts

    @property
    def cfg(self) -> SweepConfig:
        if self._cfg is None:
            values = {o.dest: self.pyconfig.getoption(o.dest) for o in OPTIONS}
            try:
                self._cfg = build_config(values, self.facts)
            except SpecError as exc:
                raise pytest.UsageError(f"lora-harness: {exc}") from None
        return self._cfg

    def _out(self, line: str) -> None:
        tr = self.pyconfig.pluginmanager.get_plugin("terminalreporter")
        capman = self.pyconfig.pluginmanager.get_plugin("capturemanager")
        if tr is not None:
            # Progress goes to the real terminal while the test's output is captured.
            if capman is not None:
                with capman.global_and_fixture_disabled():
                    _write_own_line(tr, line)
            else:
                _write_own_line(tr, line)
        else:
            print(line, flush=True)

    def get_sweep(self):
        if self.sweep is None:
            from harness.run import open_sweep

            self.sweep = open_sweep(self.cfg, self.facts, command="pytest " + " ".join(sys.argv[1:]), out=self._out,
                                    total=self.n_items or None)
            try:
                self.sweep.open_store()
            except StoreError as exc:
                raise pytest.UsageError(f"lora-harness: {exc}") from None
        return self.sweep

    def run(self, cell: CellSpec, benchmark=None) -> dict[str, Any]:
        """Run (or resume) one cell; with pytest-benchmark's fixture, time it as one round
        and put the harness's metrics in ``extra_info`` (so ``--benchmark-json`` has them)."""
        sweep = self.get_sweep()
        self._skip_if_out_of_time(sweep, cell)
        if benchmark is None:
            return sweep.run(cell)
        rec = benchmark.pedantic(sweep.run, args=(cell,), rounds=1, iterations=1, warmup_rounds=0)
        benchmark.extra_info.update({k: rec.get(k) for k in schema.bench_fields()},
                                    run_dir=str(sweep.store.dir) if sweep.store else None)
        return rec

    @staticmethod
    def _skip_if_out_of_time(sweep, cell: CellSpec) -> None:
        if cell.cell_id not in getattr(sweep, "_prerun", {}) and sweep.out_of_time(cell):
            pytest.skip(f"not run: --time-limit ({sweep.config.time_limit_s:g} s) reached before this cell started; "
                        "nothing recorded, --resume runs it")

    def check(self, record: dict[str, Any]) -> None:
        """Turn a record into the test's outcome (never a pass for a cell that didn't run)."""
        out = outcome_for(record, fail_on_oom=self.cfg.fail_on_oom)
        if out.action == "pass":
            return
        if out.action == "skip":
            pytest.skip(out.message)
        if out.action == "xfail":
            pytest.xfail(out.message)
        pytest.fail(out.message, pytrace=False)

    def close(self) -> None:
        if self.sweep is not None:
            self.sweep.close()

    # -- issue 4: the compatibility and stability suites ------------------------------
    def suite_cells(self, suite: str) -> tuple[CellSpec, ...]:
        """Cells of a suite (compat, stability, overflow) from this session's options."""
        if suite not in self._suite_cells:
            from harness.plan import suites

            values = {o.dest: self.pyconfig.getoption(o.dest) for o in OPTIONS}
            try:
                self._suite_cells[suite] = suites.cells_for(suite, values, self.facts)
            except SpecError as exc:
                raise pytest.UsageError(f"lora-harness: {exc}") from None
        return self._suite_cells[suite]

    def run_suite(self, cell: CellSpec, suite: str) -> dict[str, Any]:
        """Run a suite's cell once a session (tests that share a cell reuse its record).
        The compatibility suite attempts cells the rules predict unsupported."""
        if cell.cell_id not in self.suite_records:
            self._skip_if_out_of_time(self.get_sweep(), cell)
            self.suite_records[cell.cell_id] = self.get_sweep().run(cell, suite=suite,
                                                                    attempt_unsupported=(suite == "compat"))
        return self.suite_records[cell.cell_id]

    def check_compat(self, record: dict[str, Any]) -> None:
        """A compat cell's test outcome: a prediction the attempt contradicts fails."""
        from harness.report.compat import compat_outcome

        out = compat_outcome(record, fail_on_oom=self.cfg.fail_on_oom)
        if out.action == "skip":
            pytest.skip(out.message)
        if out.action == "xfail":
            pytest.xfail(out.message)
        if out.action != "pass":
            pytest.fail(out.message, pytrace=False)

    def compat_group(self, key: str) -> dict[str, Any]:
        """The compat records of one model/precision/load path, by checkpointing mode."""
        from harness.report.compat import group_id, row_for

        cells = [c for c in self.suite_cells("compat") if group_id(c.model, c.precision, c.resolved_load()) == key]
        return {c.grad_ckpt: row_for(self.run_suite(c, "compat")) for c in cells}

    def run_loading_checks(self) -> dict[str, Any]:
        """The loading-correctness cases (harness.cell.loader_checks) in a worker on this host's
        device, once a session; the result is also written to loading.json."""
        if self.loading is None:
            from harness.plan import suites
            from harness.core.models import resolve_model
            from harness.run.forkserver import classify

            values = {o.dest: self.pyconfig.getoption(o.dest) for o in OPTIONS}
            model = resolve_model(suites.loading_model(values, self.facts))
            if model.is_local:
                pytest.skip("the loading checks need a preset (they write a checkpoint of their own)")
            sweep = self.get_sweep()
            sweep.start()
            store = sweep.store
            out = sweep.launcher.run_job("harness.cell.loader_checks:run_checks",
                                         {"model": model.name, "opts": self.cfg.worker_opts()},
                                         timeout_s=self.cfg.cell_timeout_s, log_path=store.dir / "logs" / "loading.log")
            self.loading = out.result if out.result is not None else classify(out, self.cfg.cell_timeout_s)
            store.write_json("loading.json", self.loading)
        return self.loading

    def write_suite_reports(self) -> list[str]:
        """compat.md/.json and stability.md/.json in the run folder (harness.report.compat)."""
        from harness.report.compat import write_suite_reports

        if self.sweep is None or self.sweep.store is None or not (self.suite_records or self.loading):
            return []
        return write_suite_reports(self.sweep.store.dir)


def _write_own_line(tr, line: str) -> None:
    """A line of our own between pytest's progress dots, starting and ending a line."""
    tw = getattr(tr, "_tw", None)
    if tw is not None and getattr(tw, "width_of_current_line", 0):
        tw.line()
    tr.write_line(line)


def _session(config: pytest.Config) -> HarnessSession:
    return config.stash[_KEY]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lora-harness", "LoRA harness matrix (see README)")
    for o in OPTIONS:
        if o.kind == "flag":
            group.addoption(f"--{o.name}", dest=o.dest, action="store_true", default=False, help=o.help)
        else:
            typ = {"int": int, "float": float}.get(o.kind, str)
            group.addoption(f"--{o.name}", dest=o.dest, type=typ, default=None, help=o.help)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_KEY] = HarnessSession(config)
    # Validate the options now: a bad one is one clear line and exit code 4, before
    # collection, not a collection error with a traceback.
    if any(config.getoption(o.dest) not in (None, False) for o in OPTIONS):
        config.stash[_KEY].cfg  # noqa: B018 - raises pytest.UsageError
    if config.getoption("lh_baseline"):  # issue 3: load the baseline before anything runs
        from harness.report import gate as regress

        try:
            config.stash[_KEY].baseline = regress.from_options(config.stash[_KEY].cfg.options)
        except regress.BaselineError as exc:
            raise pytest.UsageError(f"lora-harness: --baseline: {exc}") from None
    # issue 4: the suites' own options are checked the same way
    if any(config.getoption(o.dest) is not None for o in OPTIONS if o.name.startswith(("compat-", "stability-"))):
        for suite in SUITE_PARAMS.values():
            config.stash[_KEY].suite_cells(suite)
    config.addinivalue_line("markers", "matrix: a LoRA training cell of the precision x length x checkpointing matrix")
    config.addinivalue_line("markers", "compat: the compatibility suite (every precision x checkpointing mode, "
                                       "attempted whatever the rules predict)")
    config.addinivalue_line("markers", "stability: the training stability suite (loss curves per precision vs fp32)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = _session(config)
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
        cells = list(_session(metafunc.config).cfg.cells)
        metafunc.parametrize("lora_cell", cells, ids=[c.cell_id for c in cells])
    # issue 4: compat / stability suites
    s = _session(metafunc.config)
    marks = {m.name for m in metafunc.definition.iter_markers()} & set(OPT_IN_SUITES)
    if marks and not marks & _asked_suites(metafunc.config):
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


# Suite parameters -> the suite whose cells they take (harness.plan.suites).
SUITE_PARAMS = {"compat_cell": "compat", "stability_cell": "stability", "overflow_cell": "overflow"}


# Suites that run only when asked for (their file named on the command line, or their
# marker in -m): `pytest suites/` is the matrix job, and these cost minutes on a GPU and
# answer other questions (host compatibility, stability, the seed's claims).
OPT_IN_SUITES = {"compat": "test_compat.py", "stability": "test_stability.py", "claims": "test_claims.py"}


def _asked_suites(config: pytest.Config) -> set[str]:
    markexpr = config.getoption("markexpr") or ""
    return {m for m, f in OPT_IN_SUITES.items() if m in markexpr or any(f in str(a) for a in config.args)}


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    asked = _asked_suites(config)
    keep, drop = [], []
    for item in items:
        marks = {m.name for m in item.iter_markers()} & set(OPT_IN_SUITES)
        (drop if marks and not marks & asked else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    s = _session(session.config)
    items = [i for i in session.items if "lora_cell" in getattr(i, "fixturenames", ())]
    items = items if not items or s.cfg.cells else []  # an empty --shard: pytest's skip item, no run folder
    suite_items = [i for i in session.items if set(SUITE_PARAMS) & set(getattr(i, "fixturenames", ()))]
    s.n_items = len(items) + len(suite_items)
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
        s._out(f"lora-harness: {'; '.join(what)}; run folder {sweep.store.dir}{' (resuming)' if cfg.resume else ''}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """issue 8: with --gpus, run the selected cells over the GPUs before the first test;
    each test then reports its cell's record (harness.run.pool; NOTES.md says why not xdist).
    Returns None, so pytest's own loop then runs the tests as usual."""
    s = _session(session.config)
    if not session.config.getoption("lh_gpus") or session.config.option.collectonly or session.testsfailed:
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
    return _session(request.config)


@pytest.fixture
def lora_benchmark(request: pytest.FixtureRequest):
    """pytest-benchmark's ``benchmark`` fixture, or None where that plugin is disabled."""
    if request.config.pluginmanager.hasplugin("benchmark"):
        return request.getfixturevalue("benchmark")
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    s = _session(config)
    if s.sweep is None or not s.sweep.records:
        return
    for table in s.suite_tables:  # issue 4
        terminalreporter.section(table.splitlines()[0].lstrip("# "))
        terminalreporter.write_line("\n".join(table.splitlines()[2:]).rstrip())
    tr = terminalreporter
    tr.section("lora-harness results")
    tr.write_line(format_table(SUMMARY_HEADERS, summary_rows(s.sweep.records)))
    counts = Counter(r["status"] for r in s.sweep.records)  # in order of first appearance
    tr.write_line("")
    tr.write_line(", ".join(f"{n} {st}" for st, n in counts.items())
                  + f" (OOM cells show as xfailed in pytest's counts{'; --fail-on-oom makes them fail' if not s.cfg.fail_on_oom else ''})")
    tr.write_line(f"results: {s.sweep.store.dir / 'results.jsonl'}")
    if s.baseline_verdict is not None:  # issue 3
        tr.write_line("")
        for line in s.baseline_verdict.lines:
            tr.write_line(line, red=s.baseline_verdict.failed, bold=s.baseline_verdict.failed)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the last cell: the compatibility and stability tables go into the run folder
    (issue 4); with --baseline, this session's cells are compared and the session fails
    on regression (issue 3). pytest's terminal summary, printed after this hook, shows both."""
    s = _session(session.config)
    s.suite_tables = s.write_suite_reports()
    if s.baseline is None or s.sweep is None or not s.sweep.records:
        return
    from harness.report.gate import check_sweep

    s.baseline_verdict = check_sweep(s.baseline, s.sweep.store.dir, [r["cell_id"] for r in s.sweep.records])
    if s.baseline_verdict.failed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    if _KEY in config.stash:
        _session(config).close()
