"""report.md and report.html, through the function and the CLI."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from harness.report.build import build_report
from tests.report_helpers import FIXTURES, H200, ROOT


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory):
    run = tmp_path_factory.mktemp("rep") / "cpu-mixed"
    shutil.copytree(FIXTURES / "cpu-mixed", run)
    return build_report([run])


def test_report_goes_into_the_run_folder_with_its_charts(mixed_report):
    r = mixed_report
    assert r.markdown == r.out_dir / "report.md" and r.html.is_file()
    md = r.markdown.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 5 and all((r.out_dir / link).is_file() for link in links)
    assert len(r.charts) == 10


def test_markdown_holds_every_table_the_environment_and_the_command(mixed_report):
    md = mixed_report.markdown.read_text()
    assert "51 cells from 1 run folder(s) on CPU (vm): 35 ok, 10 OOM, 3 unsupported" in md
    for heading in ("## Runs", "### Speed", "### Memory", "### Training evidence", "### Cells that did not finish",
                    "## Environment"):
        assert heading in md, heading
    # the commands from run.json
    assert "lora-harness run --device cpu --precision fp32,bf16,nf4 --seq-len 64,256,1024" in md
    # the failures with their reasons, units converted for people
    assert re.search(r"\| tiny-llama/fp4/s256/gc-off \| crash \| - \| worker killed by SIGSEGV", md)
    assert "NoMatchingPeftModuleError" in md and "killed after the cell's 0.3 s limit" in md
    assert re.search(r"\| tiny-llama/bf16/s1024/gc-off \| ok \| [0-9,]+ \| [0-9.]+ ms", md)
    assert "ok (2 records)" in md  # the retried cells
    assert "| bitsandbytes | 0.50.2, backend cpu |" in md


def test_html_is_self_contained(mixed_report):
    page = mixed_report.html.read_text()
    imgs = re.findall(r'<img src="([^"]{0,40})', page)
    assert len(imgs) == 5 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert "<table>" in page and "NoMatchingPeftModuleError" in page
    assert 'href="charts/memory--tiny-llama-cpu-vm.svg"' in page


def test_h200_report_against_its_numbers(tmp_path):
    r = build_report([H200], tmp_path)
    md = r.markdown.read_text()
    # the reference README's figures, converted from the stored bytes and seconds
    assert "| llama-3.1-8b/bf16/s8192/gc-off | ok | 84.97 GiB |" in md
    assert "| llama-3.1-8b/nf4/s8192/gc-offload | ok | 6,297 | 1,301 ms |" in md
    assert "NVIDIA H200, compute capability 9.0" in md and "Every cell finished." in md


def test_cli_report_and_its_errors(tmp_path):
    out = tmp_path / "out"
    p = cli("report", str(FIXTURES / "truncated"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    # only gc-off cells: no checkpointing trade-off to draw, so 4 charts, PNG and SVG
    assert (out / "report.html").is_file() and "charts: 8 files" in p.stdout
    # a truncated line is a warning, one line, and the rest of the report
    assert re.search(r"^lora-harness: warning: .*line 4 is not valid JSON", p.stderr, re.M)
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, msg in [
        (("report", str(tmp_path / "missing")), "no such run folder"),
        (("report", str(tmp_path)), "not a run folder (no results.jsonl)"),
        (("report", str(FIXTURES / "empty"), "--out", str(out)), "no usable records"),
        (("report", str(FIXTURES / "truncated"), str(FIXTURES / "old-schema")), "say where the report goes with --out"),
        (("report", str(FIXTURES / "truncated"), "--out", str(blocker / "x")), "cannot write the report"),
    ]:
        p = cli(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stderr.startswith("lora-harness: error:") and msg in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
