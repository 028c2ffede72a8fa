"""Every committed run folder under reports/reference/ still loads, reports, compares,
shows, costs and resumes with today's schema; and the fit dry run on the committed H200 fit
records finds its measured answers (their specs predate spec.lora.input_cast)."""

import re
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.core import host as env_mod
from harness.core.spec import CellSpec
from harness.core.store import RunStore
from harness.plan.options import build_config
from harness.report.load import load_run_set
from harness.run.sweep import Sweep

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = sorted(p for p in (ROOT / "reports" / "reference").iterdir() if (p / "results.jsonl").is_file())
FIT_RUN = ROOT / "reports" / "reference" / "h200-fit-claims-2026-11-29"


def test_there_are_reference_runs():
    assert len(REFERENCE) >= 3


@pytest.mark.parametrize("run", REFERENCE, ids=[p.name for p in REFERENCE])
def test_reference_run_loads_reports_compares_shows_and_costs(run, tmp_path, capsys):
    rs = load_run_set([run])
    assert len(rs.records) == len((run / "results.jsonl").read_text().splitlines())
    assert not [w for w in rs.warnings if "schema version" in w], rs.warnings
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### Speed" in md and "### More metrics" in md
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "compare.md")]) == 0
    assert "regression" not in capsys.readouterr().out.lower().replace("no regression", "")
    assert main(["show", str(run)]) == 0
    assert main(["sweep-cost", str(run)]) == 0
    out = capsys.readouterr().out
    assert all(r["cell_id"] in out for r in rs.cells.to_dict("records"))


@pytest.mark.parametrize("run", REFERENCE, ids=[p.name for p in REFERENCE])
def test_reference_run_resumes(run, tmp_path):
    """A sweep resuming a copy of the folder replays every recorded cell, starting nothing:
    the stored specs, upgraded, rebuild the stored cell ids."""
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    before = (copy / "results.jsonl").read_bytes()
    latest = RunStore(copy).latest_by_cell()
    cells = [CellSpec.from_dict(r["spec"]) for r in latest.values()]
    assert [c.cell_id for c in cells] == list(latest)
    facts = env_mod.quick_facts()
    cfg = build_config({"run_dir": str(copy), "resume": True, "device": "cpu"}, facts)
    sweep = Sweep(cfg, facts, out=lambda s: None)
    replayed = [sweep.run(c) for c in cells]
    assert all(r["resumed"] for r in replayed) and sweep.launcher is None  # no worker started
    assert (copy / "results.jsonl").read_bytes() == before


def _measured_table(text: str) -> dict[str, list[str]]:
    block = text.split("Longest trainable context (tokens), measured:")[1].split("\n\n")[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        budget, rest = line[:11].strip(), line[11:]
        rows[budget] = [c.strip() for c in re.split(r"\s{2,}", rest.strip())]
    return rows


def test_fit_dry_run_on_the_committed_h200_fit_records_finds_its_measured_answers(capsys):
    rc = main(["fit", "--dry-run", "--run-dir", str(FIT_RUN), "--model", "llama-3.1-8b", "--precision", "bf16,nf4",
               "--grad-ckpt", "on,offload", "--budgets", "16,24,40,80", "--granularity", "256",
               "--max-seq-len", "16384"])
    assert rc == 0
    got = _measured_table(capsys.readouterr().out)
    measured = [v for row in got.values() for v in row if v != "not measured"]
    assert len(measured) == 9, got
    # the answers fit.md recorded when the search ran
    assert got["16 GiB"] == ["OOM", "OOM", "3,840", "4,352"]
    assert got["24 GiB"] == ["3,584", "3,584", "9,216", "8,704"]
    assert got["40 GiB"][0] == "12,032"
    fit_md = (FIT_RUN / "fit.md").read_text()
    assert "| 16 GiB | OOM | OOM | 3,840 | 4,352 |" in fit_md and "| 24 GiB | 3,584 | 3,584 | 9,216 | 8,704 |" in fit_md
