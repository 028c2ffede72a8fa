#!/usr/bin/env python3
"""Open a report.html in a real headless browser (Debian's ``chromium``), check that the
page loads and that every chart image decodes, and take a full-page screenshot.

    scripts/check-report-html.py reports/examples/h200-core-2026-11-29/report.html \
        --screenshot /tmp/report.png

The check runs on a copy of the page with a probe script added (and a <base> pointing at
the report's folder, so relative links resolve as in the original): the probe waits for
the load event and writes what the browser saw of each <img> (complete, natural size)
into the DOM, which ``--dump-dom`` prints. The report itself carries no test code.

Exit codes: 0 every image loaded and the screenshot was written; 1 the check failed;
2 bad arguments; 3 no chromium on this machine (install: apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = {title: document.title, height: document.documentElement.scrollHeight,
             sections: document.querySelectorAll("h2").length, tables: document.querySelectorAll("table").length,
             images: imgs.map(function (i) { return {alt: i.alt, complete: i.complete,
                                                     width: i.naturalWidth, height: i.naturalHeight}; })};
  var pre = document.createElement("pre");
  pre.id = "report-check-result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

# Flags this container needs (no GPU, no sandbox for root, nothing phoning home).
BASE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio"]


class _ImgCounter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def handle_starttag(self, tag, attrs):  # noqa: D401 - HTMLParser's interface
        if tag == "img":
            self.count += 1


def find_chromium(given: str | None) -> str | None:
    for name in (given, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _run(browser: str, args: list[str], profile: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [browser, *BASE_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", data[16:24])


def probe_page(browser: str, page: Path, tmp: Path, timeout: float) -> dict:
    text = page.read_text()
    base = f'<base href="{page.parent.resolve().as_uri()}/">'
    text = re.sub(r"<head>", "<head>" + base, text, count=1, flags=re.I)
    text = re.sub(r"</body>", PROBE + "</body>", text, count=1, flags=re.I) if re.search("</body>", text, re.I) \
        else text + PROBE
    probe = tmp / "probe.html"
    probe.write_text(text)
    proc = _run(browser, ["--virtual-time-budget=15000", "--dump-dom", probe.as_uri()], str(tmp / "profile-dom"),
                timeout)
    m = re.search(r'<pre id="report-check-result">(.*?)</pre>', proc.stdout, re.S)
    if not m:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        raise RuntimeError(f"the page did not finish loading in chromium (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(html.unescape(m.group(1)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="report.html to check")
    ap.add_argument("--screenshot", help="where to write the full-page PNG (default: beside the report, "
                                         "report-screenshot.png)")
    ap.add_argument("--width", type=int, default=1400, help="window width in CSS pixels (default 1400)")
    ap.add_argument("--max-height", type=int, default=16000, help="cap on the screenshot's height (default 16000)")
    ap.add_argument("--chromium", help="browser binary (default: chromium on PATH, or $CHROMIUM)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per browser run (default 120)")
    ns = ap.parse_args(argv)
    page = Path(ns.report)
    if not page.is_file():
        print(f"check-report-html: error: {page}: no such file", file=sys.stderr)
        return 2
    browser = find_chromium(ns.chromium)
    if browser is None:
        print("check-report-html: error: no chromium found (apt-get install -y chromium)", file=sys.stderr)
        return 3
    counter = _ImgCounter()
    counter.feed(page.read_text())
    shot = Path(ns.screenshot) if ns.screenshot else page.with_name("report-screenshot.png")
    problems = []
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            seen = probe_page(browser, page, tmp, ns.timeout)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            print(f"check-report-html: FAILED: {exc}", file=sys.stderr)
            return 1
        images = seen.get("images", [])
        if counter.count == 0:
            problems.append("the page has no <img>: no chart to check")
        if len(images) != counter.count:
            problems.append(f"the browser saw {len(images)} images, the file has {counter.count} <img> tags")
        for i, img in enumerate(images, 1):
            if not img.get("complete") or not img.get("width") or not img.get("height"):
                problems.append(f"image {i} ({img.get('alt')!r}) did not load")
        height = min(max(int(seen.get("height") or 0), 600), ns.max_height)
        shot.parent.mkdir(parents=True, exist_ok=True)
        proc = _run(browser, [f"--window-size={ns.width},{height}", f"--screenshot={shot.resolve()}",
                              "--virtual-time-budget=15000", page.resolve().as_uri()], str(tmp / "profile-shot"),
                    ns.timeout)
        try:
            w, h = png_size(shot)
        except (OSError, ValueError) as exc:
            problems.append(f"no screenshot ({exc}; chromium exit {proc.returncode})")
            w = h = 0
    print(f"page: {page} ({seen.get('title')!r}): {seen.get('sections')} sections, {seen.get('tables')} tables, "
          f"{len(images)} images, {sum(1 for i in images if i.get('width'))} loaded")
    for i, img in enumerate(images, 1):
        print(f"  image {i}: {img.get('width')}x{img.get('height')} px, {img.get('alt')}")
    if w:
        print(f"screenshot: {shot} ({w}x{h} px)")
    for p in problems:
        print(f"check-report-html: FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
