"""report.html in a real headless browser (scripts/check-report-html.py). Needs Debian's
``chromium`` package. Where it is missing the tests skip and say why, except where
``LORA_HARNESS_REQUIRE_BROWSER=1`` (CI sets it): there a missing browser is a failure, so
a landing can never pass without the page having been opened."""

import os
import shutil
import subprocess
import sys

import pytest

from harness.report.build import build_report
from tests.report_helpers import FIXTURES, ROOT

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("LORA_HARNESS_REQUIRE_BROWSER") == "1"
NO_BROWSER = "no chromium on this machine (apt-get install -y chromium); the browser check of report.html needs one"


def _browser() -> str:
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail(NO_BROWSER + " and LORA_HARNESS_REQUIRE_BROWSER=1 says it must run here")
        pytest.skip(NO_BROWSER)
    return CHROMIUM


def test_report_loads_in_chromium_with_every_chart(tmp_path):
    browser = _browser()
    files = build_report([FIXTURES / "cpu-mixed"], tmp_path / "report")
    shot = tmp_path / "shot.png"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "check-report-html.py"), str(files.html),
                        "--screenshot", str(shot), "--chromium", browser], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "5 images, 5 loaded" in p.stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_a_broken_chart_fails_the_check(tmp_path):
    browser = _browser()
    files = build_report([FIXTURES / "truncated"], tmp_path / "report", embed=False)  # charts linked, not embedded
    os.remove(next(files.out_dir.glob("charts/memory--*.png")))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "check-report-html.py"), str(files.html),
                        "--screenshot", str(tmp_path / "shot.png"), "--chromium", browser],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "did not load" in p.stderr, p.stdout + p.stderr
