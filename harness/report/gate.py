"""Baseline checks for people and CI: ``lora-harness compare``, and ``--baseline`` at the
end of ``pytest suites/`` or ``lora-harness run``. Loads runs, compares them
(harness.report.compare), writes the markdown report and says whether anything regressed.
Imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

from harness.report.compare import DEFAULT_THRESHOLDS, Comparison, CompareError, Threshold, check_metrics, compare, parse_thresholds
from harness.core.schema import SCHEMA_VERSION
from harness.report.load import RunLoadError, RunSet, load_run_set
from harness.report.compare_md import regression_lines, summary_line, to_markdown

REPORT_NAME = "compare.md"


class BaselineError(CompareError):
    """The baseline or the thresholds cannot be used (one line, for the user)."""


@dataclass(frozen=True, eq=False)
class BaselineCheck:
    """A loaded baseline and the thresholds to judge a run against it."""

    paths: tuple[str, ...]
    thresholds: tuple[Threshold, ...]
    baseline: RunSet
    allow_missing: bool = False  # baseline cells absent from the current run are listed, not failed
    across_gpus: bool = False  # compare cells measured on different GPU models too


@dataclass(frozen=True, eq=False)
class Outcome:
    comparison: Comparison
    report: Path | None
    summary: str
    lines: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def regressed(self) -> bool:
        return self.comparison.regressed

    @property
    def inconclusive(self) -> bool:
        return self.comparison.inconclusive

    @property
    def exit_code(self) -> int:
        """1: a regression; 3: none, but a change inside an unstable cell could not be
        judged (cannot tell: not a pass); 0: every check passed."""
        return 1 if self.regressed else 3 if self.inconclusive else 0


def split_paths(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [p.strip() for p in items if str(p).strip()]


def prepare(baseline: str | Sequence[str], fail: str | Sequence[str] | None = None, *,
            allow_missing: bool = False, across_gpus: bool = False) -> BaselineCheck:
    """Load the baseline and parse the thresholds now, before anything runs: a typo in
    either should cost seconds, not a whole sweep."""
    paths = split_paths(baseline)
    if not paths:
        raise BaselineError("--baseline needs a run folder")
    texts = split_paths(fail) if fail else list(DEFAULT_THRESHOLDS)
    try:
        thresholds = parse_thresholds(texts)
        base = load_run_set(paths)
        check_metrics(thresholds, base.records)
    except (CompareError, RunLoadError) as exc:
        raise BaselineError(str(exc)) from None
    if not thresholds:
        raise BaselineError("no threshold given")
    _refuse_newer(base, "baseline")
    return BaselineCheck(tuple(paths), thresholds, base, allow_missing, across_gpus)


def _refuse_newer(rs: RunSet, side: str) -> None:
    """Records a newer harness wrote hold fields this one cannot judge: comparing them
    would compare what it does not understand."""
    if "schema_version" not in rs.records.columns:
        return
    newer = sorted({int(v) for v in rs.records["schema_version"].dropna() if int(v) > SCHEMA_VERSION})
    if newer:
        raise BaselineError(f"the {side} holds records of schema version {', '.join(map(str, newer))}, newer than "
                            f"this harness's {SCHEMA_VERSION}: compare them with the harness that wrote them")


def label(rs: RunSet) -> str:
    runs = "; ".join(f"{r.run_id} ({_shown(r.path)}, {r.device_label}, {r.n_records} records)" for r in rs.runs)
    return runs or "?"


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def check(chk: BaselineCheck, current: str | Sequence[str], *, out: str | os.PathLike | None = None,
          only_cells: Collection[str] | None = None) -> Outcome:
    """Compare ``current`` run folder(s) with the baseline; write the markdown report to
    ``out`` (default: ``compare.md`` in the first current run folder)."""
    paths = split_paths(current)
    cur = load_run_set(paths)
    records = cur.records
    if only_cells is not None:
        records = records[records["cell_id"].isin(set(only_cells))]
        if records.empty:
            raise BaselineError("this session recorded no cell to compare")
    _refuse_newer(cur, "current run")
    base = chk.baseline.records
    if only_cells is not None:  # a session's cells: the baseline's others are not missing from it
        base = base[base["cell_id"].isin(set(only_cells))]
    cmp = compare(base, records, chk.thresholds, allow_missing=chk.allow_missing, across_gpus=chk.across_gpus)
    unchecked = cmp.unchecked()
    if unchecked:
        hint = " (no VRAM is measured on a CPU host)" if any("vram" in u.metric for u in unchecked) else ""
        raise BaselineError(f"nothing checked: no compared cell has {', '.join(u.metric for u in unchecked)} on "
                            f"both sides{hint}; thresholds {', '.join(u.text for u in unchecked)} cannot pass")
    warnings = tuple(f"baseline: {w}" for w in chk.baseline.warnings) + tuple(f"current: {w}" for w in cur.warnings)
    text = to_markdown(cmp, label(chk.baseline), label(cur), warnings)
    target = Path(out) if out else Path(cur.runs[0].path) / REPORT_NAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError as exc:
        raise BaselineError(f"cannot write the regression report {target}: {exc.strerror or exc}") from None
    return Outcome(cmp, target, summary_line(cmp), tuple(regression_lines(cmp)), warnings + cmp.warnings)


# -- the end of a sweep (CLI `run` and the pytest plugin) --------------------------------
def from_options(options: dict) -> BaselineCheck | None:
    """The sweep options' ``--baseline`` / ``--baseline-fail``, prepared; None without."""
    if not options.get("baseline"):
        return None
    return prepare(options["baseline"], options.get("baseline-fail"),
                   across_gpus=bool(options.get("baseline-across-gpus")))


@dataclass(frozen=True)
class SweepVerdict:
    """What to tell the user after a sweep, and whether it fails the session."""

    failed: bool
    lines: tuple[str, ...]
    report: Path | None = None


def check_sweep(chk: BaselineCheck, run_dir: str | os.PathLike, cell_ids: Collection[str]) -> SweepVerdict:
    """Compare the sweep's cells (read back from its run folder, retries included) with
    the baseline; the report goes into the run folder. Never raises for bad data: an
    unusable comparison fails the session with its reason."""
    try:
        out = check(chk, [str(run_dir)], only_cells=set(cell_ids))
    except (CompareError, RunLoadError) as exc:
        return SweepVerdict(True, (f"lora-harness: baseline comparison failed: {exc}",))
    lines = [f"lora-harness: baseline: {out.summary}", *out.lines]
    lines += [f"lora-harness: warning: {w}" for w in out.warnings]
    lines.append(f"lora-harness: regression report: {out.report}")
    return SweepVerdict(out.regressed or out.inconclusive, tuple(lines), out.report)
