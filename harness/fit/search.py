"""The fit search over real cells: rows x budgets -> longest context, reusing every record.
Parent side (no torch). ``lora-harness fit`` and ``suites/test_fit.py`` are thin skins
over :class:`FitSearch`; the claims suite uses it too.

A search cell ("probe") is a real training cell under a VRAM budget with one warm-up and
one measured step: the second step is the first with the optimizer state in memory, so
it reaches the steady-state peak; timing is not what a probe is for. Its id ends in
``/vram<size>/fit``.

Reuse: every ok / oom record of the run folder with the same spec is used instead of
running the cell again (a run folder is the unit of measurement; use a fresh folder to
measure again), and every record of a row speaks for the budgets it can (``harness.fit``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.fit import rules as fitlib
from harness.fit import memmodel
from harness.plan.budgets import check_against_device
from harness.core.budget import parse_budgets
from harness.core.spec import CellSpec
from harness.core.errors import SpecError
from harness.core.store import load_records

PROBE_WARMUP_STEPS = 1
PROBE_STEPS = 1
PROBE_TAG = "fit"
MODEL_METRIC = "torch_peak_allocated_bytes"


@dataclass(frozen=True)
class FitSettings:
    budgets_bytes: tuple[int, ...]
    granularity: int = 256
    max_seq_len: int | None = None  # None: the model's max_position_embeddings
    time_limit_s: float | None = None
    prior_dirs: tuple[str, ...] = ()


def fit_settings(values: dict[str, Any], facts: dict[str, Any], *, need_device: bool = True) -> FitSettings:
    """The fit options (keyed like ``build_config``'s input); user errors raise SpecError."""
    def get(name):
        return values.get("lh_" + name.replace("-", "_"), values.get(name.replace("-", "_")))

    budgets = parse_budgets(get("budgets"), what="--budgets")
    if not budgets:
        raise SpecError("--budgets is required, e.g. --budgets 16,24,40,80 (GiB)")
    if need_device:
        for b in budgets:
            check_against_device(b, facts, what="--budgets")
    gran = get("granularity")
    gran = 256 if gran is None else gran
    if int(gran) < 1:
        raise SpecError(f"--granularity must be at least 1 token, got {gran}")
    max_len = get("max-seq-len")
    if max_len is not None and int(max_len) < int(gran):
        raise SpecError(f"--max-seq-len {max_len} is below one step of --granularity {gran}")
    limit = get("time-limit")
    if limit is not None and float(limit) <= 0:
        raise SpecError("--time-limit must be positive")
    priors = tuple(p.strip() for p in str(get("prior") or "").split(",") if p.strip())
    for p in priors:
        if not (Path(p) / "results.jsonl").is_file():
            raise SpecError(f"--prior {p}: not a run folder (no results.jsonl)")
    return FitSettings(tuple(budgets), int(gran), None if max_len is None else int(max_len),
                       None if limit is None else float(limit), priors)


def load_prior(dirs: tuple[str, ...]) -> list[dict[str, Any]]:
    """--prior: every record of those run folders, read as today's schema (load_records)."""
    out: list[dict[str, Any]] = []
    for d in dirs:
        out.extend(load_records(Path(d) / "results.jsonl"))
    return out


def fit_rows(cells: tuple[CellSpec, ...] | list[CellSpec]) -> list[CellSpec]:
    """One template per row (the sweep's cells with length, budget and tag dropped)."""
    rows: dict[tuple, CellSpec] = {}
    for c in cells:
        t = c.replace(seq_len=2, vram_budget_bytes=None, tag="", warmup_steps=probe_warmup(c), steps=PROBE_STEPS)
        rows.setdefault(fitlib.row_key(t.to_dict()), t)
    return list(rows.values())


def row_label(row: CellSpec) -> str:
    """``nf4-dq gc-on``; rows of other stacks, compiled or with another attention kernel
    say so (``nf4-dq gc-on unsloth``), so fit.md never shows two stacks under one label."""
    s = f"{row.precision} gc-{row.grad_ckpt}"
    s += f" b{row.batch_size}" if row.batch_size != 1 else ""
    s += f" {row.stack}" if row.stack != "hf" else ""
    s += " compiled" if row.compile else ""
    return s + (f" attn-{row.attn_implementation}" if row.attn_implementation != "sdpa" else "")


def model_max_len(row: CellSpec) -> int:
    """The model's own longest context (max_position_embeddings), the default search cap."""
    if row.model_path:
        cfg = json.loads((Path(row.model_path) / "config.json").read_text())
    else:
        from harness.core.models import get_preset

        cfg = get_preset(row.model)["config"]
    return int(cfg.get("max_position_embeddings") or 131072)


def probe_warmup(cell: CellSpec) -> int:
    """A probe's warm-up steps: a compiled cell needs two (one uncompiled, one compiling)."""
    return max(PROBE_WARMUP_STEPS, 2 if cell.compile else 0)


def probe_cell(row: CellSpec, seq_len: int, budget_bytes: int) -> CellSpec:
    return row.replace(seq_len=seq_len, vram_budget_bytes=budget_bytes, warmup_steps=probe_warmup(row),
                       steps=PROBE_STEPS, tag=PROBE_TAG)


def measure_with_reuse(sweep, cell: CellSpec) -> dict[str, Any]:
    """The cell's ok / oom record from the run folder if there is one (same spec), else run it."""
    want = cell.to_dict()
    for rec in reversed(sweep.open_store().records()):  # upgraded: older specs carry today's defaults
        if rec.get("cell_id") == cell.cell_id and rec.get("spec") == want and rec.get("status") in ("ok", "oom"):
            rec = dict(rec, resumed=True)
            sweep.records.append(rec)
            return rec
    return sweep.run(cell)


@dataclass(frozen=True)
class Answer:
    row: str
    budget_bytes: int
    status: str  # found, oom, at_cap, open, inconsistent, incomplete, error, unsupported
    longest: int | None
    fit: fitlib.Observation | None = None
    fail: fitlib.Observation | None = None
    message: str = ""
    probes: tuple[str, ...] = ()

    @property
    def measured(self) -> bool:
        """A complete answer backed by cells (what a test may pass on)."""
        return self.status in ("found", "oom", "at_cap")

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "budget_bytes": self.budget_bytes, "status": self.status, "longest": self.longest,
                "fit": None if self.fit is None else vars(self.fit), "message": self.message,
                "fail": None if self.fail is None else vars(self.fail), "probes": list(self.probes)}


@dataclass
class FitSearch:
    """Answers (row, budget) questions by running probes through ``measure``."""

    settings: FitSettings
    measure: Callable[[CellSpec], dict[str, Any]]
    records: list[dict[str, Any]] = field(default_factory=list)
    prior: list[dict[str, Any]] = field(default_factory=list)
    out: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    # What --time-limit counts from, on ``clock``: the search's start by default; the CLI
    # and the suite pass their process's start (``process_started_at``), so a job's
    # limit covers the worker-server start and whatever ran before the search.
    started_at: float | None = None

    def __post_init__(self) -> None:
        self.t0 = self.clock()
        if self.started_at is None:
            self.started_at = self.t0
        self.answers: dict[tuple[tuple, int], Answer] = {}
        # (row, budget) -> each memory model's longest length, predicted before the search
        # ran a cell there (harness.fit.evaluate.predict); fit.md holds them beside the answers
        self.predicted: dict[tuple[tuple, int], dict[str, int | None]] = {}
        self.rows: dict[tuple, CellSpec] = {}
        self.cells_run = 0
        self.cells_reused = 0
        self.cell_time_s = 0.0

    # -- what the records say --------------------------------------------------------
    def grid(self, row: CellSpec) -> fitlib.Grid:
        return fitlib.Grid(self.settings.granularity, self.settings.max_seq_len or model_max_len(row))

    def row_records(self, row: CellSpec, source: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        key = fitlib.row_key(row.to_dict())
        return [r for r in (self.records if source is None else source)
                if r.get("spec") and r.get("seq_len") and fitlib.row_key(r["spec"]) == key]

    def bracket(self, row: CellSpec, budget: int) -> fitlib.Bracket:
        obs = [o for r in self.row_records(row) if (o := fitlib.verdict(r, budget)) is not None]
        return fitlib.bracket(obs, self.grid(row))

    def model(self, row: CellSpec, metric: str = MODEL_METRIC) -> memmodel.MemModel | None:
        """Fitted on this run's cells of the row; prior records only while those are too few."""
        quad = memmodel.wants_quadratic(row.attn_implementation)
        own = memmodel.points_from_records(self.row_records(row), metric)
        for pts in (own, own + memmodel.points_from_records(self.row_records(row, self.prior), metric)):
            try:
                return memmodel.fit(pts, metric=metric, quadratic=quad)
            except memmodel.ModelError:
                continue
        return None

    def host_overheads(self) -> tuple[int | None, int | None]:
        """(baseline, memory outside the allocator) of the latest CUDA cell measured (this
        run's, else a prior run's: figures for guesses only)."""
        for r in list(reversed(self.records)) + list(reversed(self.prior)):
            if r.get("baseline_vram_bytes") is not None and r.get("cuda_context_bytes") is not None:
                return r["baseline_vram_bytes"], r.get("non_allocator_peak_bytes") or r["cuda_context_bytes"]
        return None, None

    def guess(self, row: CellSpec, budget: int, *, capped: bool = True) -> int | None:
        """The memory model's longest length under ``budget``: a prediction."""
        m = self.model(row)
        if m is None:
            return None
        models: dict[tuple, memmodel.MemModel | None] = {}
        pairs = []
        for r in self.records:  # budget cells of every row, each with its own row's model
            spec = r.get("spec") or {}
            if not spec.get("vram_budget_bytes") or not r.get("seq_len"):
                continue
            k = fitlib.row_key(spec)
            if k not in models:
                models[k] = self.model(CellSpec.from_dict(spec))
            pairs.append((r, models[k]))
        base, outside = self.host_overheads()
        grid = self.grid(row)
        if not capped:
            grid = fitlib.Grid(grid.granularity, 10 ** 7)
        return fitlib.guess_longest(m, budget, grid, batch_size=row.batch_size, baseline_bytes=base,
                                    non_allocator_bytes=outside,
                                    margin_bytes=fitlib.fragmentation_margin(pairs))

    # -- the search ------------------------------------------------------------------
    def solve(self, row: CellSpec, budget: int) -> Answer:
        key = (fitlib.row_key(row.to_dict()), budget)
        self.rows.setdefault(key[0], row)
        if key not in self.predicted:  # stored before any cell of this (row, budget) runs
            from harness.fit.evaluate import predict

            grid = fitlib.Grid(self.grid(row).granularity, 10 ** 7)
            self.predicted[key] = predict(self.records + self.prior, row, budget, grid)
        history: list[tuple[int, bool]] = []
        probes: list[str] = []
        label = f"{row_label(row)} @ {budget / 2 ** 30:g} GiB"
        while True:
            br = self.bracket(row, budget)
            if br.status != "open":
                ans = Answer(row_label(row), budget, br.status, br.longest, br.fit, br.fail, probes=tuple(probes))
                break
            if self.settings.time_limit_s is not None and self.clock() - self.started_at > self.settings.time_limit_s:
                ans = Answer(row_label(row), budget, "incomplete", None, br.fit, br.fail, probes=tuple(probes),
                             message=f"time limit ({self.settings.time_limit_s:g} s) reached; known: "
                                     f"fits {br.lo or '-'}, fails {br.hi or '-'}")
                break
            n = fitlib.next_probe(br, self.guess(row, budget), history)
            assert n is not None
            rec = self.run_probe(probe_cell(row, n, budget))
            probes.append(rec["cell_id"])
            if rec["status"] not in ("ok", "oom"):
                st = "unsupported" if rec["status"] == "unsupported" else "error"
                ans = Answer(row_label(row), budget, st, None, br.fit, br.fail, probes=tuple(probes),
                             message=f"{rec['cell_id']}: {rec['status']}: {str(rec.get('error') or '')[:300]}")
                break
            history.append((n, rec["status"] == "ok"))
            self.out(f"fit {label}: s{n} {'fits' if rec['status'] == 'ok' else 'OOM'}; "
                     f"bracket now {self._bracket_text(row, budget)}")
        self.answers[key] = ans
        return ans

    def run_probe(self, cell: CellSpec) -> dict[str, Any]:
        """Measure one cell (or reuse its record) and add it to what the search knows."""
        rec = self.measure(cell)
        if rec.get("resumed"):
            self.cells_reused += 1
        else:
            self.cells_run += 1
            self.cell_time_s += float(rec.get("wall_time_s") or 0.0)
        if not any(r is rec or (r.get("cell_id") == rec["cell_id"] and r.get("timestamp") == rec.get("timestamp"))
                   for r in self.records):
            self.records.append(rec)
        return rec

    def peek(self, row: CellSpec, budget: int) -> Answer:
        """The answer the records already give, without running anything (--dry-run)."""
        key = (fitlib.row_key(row.to_dict()), budget)
        self.rows.setdefault(key[0], row)
        br = self.bracket(row, budget)
        ans = Answer(row_label(row), budget, br.status, br.longest, br.fit, br.fail)
        self.answers[key] = ans
        return ans

    def _bracket_text(self, row: CellSpec, budget: int) -> str:
        br = self.bracket(row, budget)
        return f"fits {br.lo if br.lo is not None else '-'} / fails {br.hi if br.hi is not None else '-'} ({br.status})"

    def elapsed_s(self) -> float:
        return self.clock() - self.t0


def open_search(settings: FitSettings, sweep, *, out: Callable[[str], None] = print,
                started_at: float | None = None) -> "FitSearch":
    """The search as every front-end assembles it (``lora-harness fit``, the fit and claims
    suites): cells measured through ``sweep`` and its records reused, the memory model
    seeded from the --prior runs."""
    return FitSearch(settings, measure=lambda c: measure_with_reuse(sweep, c), records=sweep.open_store().records(),
                     prior=load_prior(settings.prior_dirs), out=out, started_at=started_at)
