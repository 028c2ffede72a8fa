"""scripts/h200-fit.sh's exact pytest command, run on this CPU host against a fake H200
(tests/fake_gpu.py): its options parse, the fit and claims suites run through their real
code (parametrisation, fixtures, the search, reuse between the suites, the reports), and
the script's closing summary reads what they wrote. Device time is scarce: a mistake
here must not be found on the H200."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness.fit import rules as F
from harness.core.budget import GIB
from tests.fakes import FakeHost

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = (ROOT / "scripts" / "h200-fit.sh").read_text()


def _pytest_args(run_dir):
    cmd = SCRIPT[SCRIPT.index("\npython3 -m pytest") + 1:SCRIPT.index("\nrc=$?")].replace("\\\n", " ")
    args = shlex.split(cmd)[3:]
    return [str(run_dir) if a == "$RUN" else a for a in args]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("h200") / "h200-fit"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", *_pytest_args(run_dir), "-p", "tests.fake_gpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    summary_py = SCRIPT[SCRIPT.index("<<'EOF'\n") + 8:SCRIPT.rindex("\nEOF")]
    summary = subprocess.run([sys.executable, "-", str(run_dir), "290"], input=summary_py, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    return proc, run_dir, summary


def test_the_job_runs_both_suites(job):
    proc, run_dir, _ = job
    out = proc.stdout
    # the fake host refutes three claims, each in one checkpointing mode: 16-bit with no
    # checkpointing does not fit 2048 tokens in 24 GiB; with gc-on int8 keeps more memory
    # than bf16, so 16-bit's VRAM is not between fp32's and 8-bit's and 8-bit extends nothing
    assert proc.returncode == 1, out[-4000:] + proc.stderr[-2000:]
    assert "3 failed" in out and "test_16bit_fits_2048_tokens_in_24gb[off]" in out
    assert "test_16bit_vram_between_fp32_and_8bit[on]" in out and "test_8bit_extends_length_further[on]" in out
    assert out.count("PASSED suites/test_fit.py::test_longest_context") == 16
    assert "REFUTED" in out and "claims (../shared/SEED.md), measured on this host" in out


def test_the_fit_table_is_exact(job):
    _, run_dir, _ = job
    data = json.loads((run_dir / "fit.json").read_text())
    assert [r["row"] for r in data["rows"]] == ["bf16 gc-on", "bf16 gc-offload", "nf4 gc-on", "nf4 gc-offload"]
    host = FakeHost()
    for r in data["rows"]:
        host.fixed, host.per_token = FakeHost.SHAPES[(r["precision"], r["grad_ckpt"])]
        grid = F.Grid(256, r["max_seq_len"])
        assert r["max_seq_len"] == 16384
        for a in r["answers"]:
            want = host.threshold(a["budget_bytes"], grid)
            if want is None:
                assert a["status"] == "oom", (r["row"], a)
            elif want == 16384:
                assert a["status"] == "at_cap", (r["row"], a)
            else:
                assert a["status"] == "found" and a["longest"] == want, (r["row"], a)
    assert [b / GIB for b in data["budgets_bytes"]] == [16, 24, 40, 80]
    md = (run_dir / "fit.md").read_text()
    assert "| VRAM budget | bf16 gc-on | bf16 gc-offload | nf4 gc-on | nf4 gc-offload |" in md
    assert (run_dir / "fit.png").is_file()


def test_the_suites_share_their_cells(job):
    _, run_dir, _ = job
    verdicts = json.loads((run_dir / "claims.json").read_text())
    # every claim in every checkpointing mode; only gc-off has nothing to say about checkpointing
    assert len(verdicts) == 18
    assert [(v["claim"], v["grad_ckpt"]) for v in verdicts if v["verdict"] == "skipped"] == [("ckpt-extends", "off")]
    recs = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    ids = [r["cell_id"] for r in recs]
    assert len(ids) == len(set(ids))  # no cell measured twice
    # the comparison cells: four precisions x three modes x two seeds
    cmp = [r for r in recs if r["spec"]["vram_budget_bytes"] is None]
    assert sorted((r["precision"], r["grad_ckpt"], r["spec"]["seed"]) for r in cmp) == sorted(
        (p, m, s) for p in ("fp32", "bf16", "int8", "nf4") for m in ("off", "on", "offload") for s in (0, 1))
    # int8 one step past bf16's longest, in each mode
    assert sorted(r["grad_ckpt"] for r in recs if r["spec"]["tag"] == "fit" and r["precision"] == "int8") == \
        ["off", "offload", "on"]
    assert "**REFUTED**" in (run_dir / "claims.md").read_text()


def test_the_closing_summary(job):
    _, run_dir, summary = job
    assert summary.returncode == 0, summary.stderr
    assert "h200-fit:" in summary.stdout and "fit-search probes" in summary.stdout
    assert "fit search:" in summary.stdout and "4.8 min" in summary.stdout


def test_the_fit_command_line_on_the_fake_h200(tmp_path):
    """``lora-harness fit`` (not only the suite) through the same fake host: it searches,
    prints the table, writes the report, and a second call reuses every record."""
    code = ("import sys, tests.fake_gpu; from harness.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["fit", "--precision", "nf4", "--grad-ckpt", "on", "--budgets", "16,24", "--max-seq-len", "8192",
            "--run-dir", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    host = FakeHost()
    host.fixed, host.per_token = FakeHost.SHAPES[("nf4", "on")]
    want = host.threshold(16 * GIB, F.Grid(256, 8192))
    assert f"nf4 gc-on @ 16 GiB -> {want:,}" in first.stdout and "Longest trainable context" in first.stdout
    assert (tmp_path / "run" / "fit.md").is_file() and (tmp_path / "run" / "fit.png").is_file()
    n = len((tmp_path / "run" / "results.jsonl").read_text().splitlines())
    second = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert second.returncode == 0 and "search: 0 cells run" in second.stdout, second.stdout[-2000:]
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == n
