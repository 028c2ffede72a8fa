"""The pytest session's side of the harness: its sweep configuration, the running sweep,
the records, and what the suites ask of it (``lora_harness`` fixture). The hooks that
drive it are in ``harness.pytest_plugin``."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from harness.core import schema
from harness.core.errors import SpecError
from harness.core.record import outcome_for
from harness.core.spec import CellSpec
from harness.core.store import StoreError
from harness.plan.options import OPTIONS, SweepConfig, build_config

# Suite parameters -> the suite whose cells they take (harness.plan.suites).
SUITE_PARAMS = {"compat_cell": "compat", "stability_cell": "stability", "overflow_cell": "overflow"}
# Suites that run only when asked for (their file named on the command line, or their
# marker in -m): `pytest suites/` is the matrix job, and these cost minutes on a GPU and
# answer other questions (host compatibility, stability, the seed's claims).
OPT_IN_SUITES = {"compat": "test_compat.py", "stability": "test_stability.py", "claims": "test_claims.py"}


def asked_suites(config: pytest.Config) -> set[str]:
    """The opt-in suites this session asked for."""
    markexpr = config.getoption("markexpr") or ""
    return {m for m, f in OPT_IN_SUITES.items() if m in markexpr or any(f in str(a) for a in config.args)}


def option_values(config: pytest.Config) -> dict[str, Any]:
    """The harness's options as this session was given them (by ``Opt.dest``)."""
    return {o.dest: config.getoption(o.dest) for o in OPTIONS}


class HarnessSession:
    """Per pytest session: the sweep configuration, the running sweep, the records."""

    def __init__(self, config: pytest.Config) -> None:
        self.pyconfig = config
        self._facts: dict[str, Any] | None = None
        self._cfg: SweepConfig | None = None
        self.sweep = None
        self.n_items = 0
        self.baseline = None  # harness.report.gate.BaselineCheck with --baseline
        self.baseline_verdict = None
        self._suite_cells: dict[str, tuple[CellSpec, ...]] = {}  # compat / stability
        self.suite_records: dict[str, dict[str, Any]] = {}
        self.suite_tables: list[str] = []
        self.loading: dict[str, Any] | None = None
        self.cell_nodeids: set[str] = set()  # tests that run a cell: the harness prints their progress
        self.nothing_ran = ""  # why no cell could run, when none could

    @property
    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            from harness.run import sweep_facts

            try:  # with --ray a GPU node's facts, not this host's
                self._facts = sweep_facts(option_values(self.pyconfig))
            except SpecError as exc:
                raise pytest.UsageError(f"lora-harness: {exc}") from None
        return self._facts

    @property
    def cfg(self) -> SweepConfig:
        if self._cfg is None:
            values = option_values(self.pyconfig)
            try:
                self._cfg = build_config(values, self.facts)
            except SpecError as exc:
                raise pytest.UsageError(f"lora-harness: {exc}") from None
        return self._cfg

    def out(self, line: str) -> None:
        """A line of progress on the real terminal, between pytest's own output (suites
        use it for their tables and answers)."""
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

            self.sweep = open_sweep(self.cfg, self.facts, command="pytest " + " ".join(sys.argv[1:]), out=self.out,
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

    # -- the compatibility and stability suites ---------------------------------------
    def suite_cells(self, suite: str) -> tuple[CellSpec, ...]:
        """Cells of a suite (compat, stability, overflow) from this session's options."""
        if suite not in self._suite_cells:
            from harness.plan import suites

            values = option_values(self.pyconfig)
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

            values = option_values(self.pyconfig)
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

    def fit_search(self, settings):
        """The longest-context search over this session's sweep (the fit and claims suites)."""
        from harness.core.phases import process_started_at
        from harness.fit.search import open_search

        sweep = self.get_sweep()
        sweep.total = 0  # a search does not know its cell count in advance
        return open_search(settings, sweep, out=self.out, started_at=process_started_at())

    def write_suite_reports(self) -> list[str]:
        """compat.md/.json and stability.md/.json in the run folder (harness.report.compat)."""
        from harness.report.compat import write_suite_reports

        if self.sweep is None or self.sweep.store is None or not (self.suite_records or self.loading):
            return []
        return write_suite_reports(self.sweep.store.dir)


def _write_own_line(tr, line: str) -> None:
    """A line of our own between pytest's progress, starting and ending a line. Written
    past pytest's reporter, which would otherwise print the test file's name again after
    each of our lines."""
    tw = getattr(tr, "_tw", None)
    if tw is None:
        tr.write_line(line)
        return
    if getattr(tw, "width_of_current_line", 0):
        tw.line()
    tw.line(line)
