"""The docs a newcomer reads stay true: the generated pages are current, the README stays
short, and every relative link in README.md and docs/ leads somewhere."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_the_options_page_is_generated_from_the_options():
    out = subprocess.run([sys.executable, "scripts/gen-options-doc.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert (ROOT / "docs" / "options.md").read_text() == out, "run: python scripts/gen-options-doc.py > docs/options.md"
    assert "## Other options" not in out  # every option has its group


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "pytest suites/" in first_block and "pytest tests/" in first_block


def test_relative_links_resolve():
    broken = []
    for page in [ROOT / "README.md", ROOT / "NOTES.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted((ROOT / "reports" / "reference").glob("*/README.md"))]:
        for target, _anchor in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
