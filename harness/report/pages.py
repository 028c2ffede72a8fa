"""Report pages from a list of blocks: one document model, two renderings.

A page is a sequence of blocks (heading, paragraph, table, figure, code, list).
``to_markdown`` links figures by relative path (the PNGs sit beside the page);
``to_html`` embeds them as data URIs, so report.html is one self-contained file that
can be mailed or uploaded as a CI artifact and still shows every chart. Pure apart from
reading the image files to embed.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str
    kind: str = "text"  # text, warning, verdict-ok, verdict-bad


@dataclass(frozen=True)
class TableBlock:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class FigureBlock:
    png: str  # path relative to the page
    alt: str
    caption: str = ""
    svg: str | None = None


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...] = field(default_factory=tuple)


Block = Union[Heading, Para, TableBlock, FigureBlock, Code, Bullets]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> TableBlock:
    return TableBlock(tuple(headers), tuple(tuple(str(c) for c in r) for r in rows), caption)


# -- markdown ---------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Para):
            prefix = {"warning": "> **Warning:** ", "verdict-bad": "**", "verdict-ok": "**"}.get(b.kind, "")
            suffix = "**" if b.kind.startswith("verdict") else ""
            out += [prefix + b.text + suffix, ""]
        elif isinstance(b, TableBlock):
            if b.caption:
                out += [b.caption, ""]
            if not b.rows:
                out += [] if b.caption else ["(none)", ""]
                continue
            num = _numeric_columns(b)
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join("---:" if i in num else "---" for i in range(len(b.headers))) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows]
            out.append("")
        elif isinstance(b, FigureBlock):
            out.append(f"![{b.alt}]({b.png})")
            extra = f" ([SVG]({b.svg}))" if b.svg else ""
            out += ["", f"*{b.caption}*{extra}" if b.caption else extra.strip(), ""]
        elif isinstance(b, Code):
            out += ["```", b.text, "```", ""]
        elif isinstance(b, Bullets):
            out += [f"- {i}" for i in b.items] + [""]
    return "\n".join(out).rstrip() + "\n"


# -- HTML -------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1500px;
       padding: 0 1.5rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .86rem; }
th, td { border: 1px solid #ddd; padding: .25rem .55rem; text-align: left; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
.num { text-align: right; }
td.text { white-space: normal; max-width: 60rem; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; }
pre { background: #f6f6f6; padding: .7rem; overflow-x: auto; font-size: .85rem; }
.warning { background: #fff4e0; border-left: 4px solid #ff9800; padding: .4rem .8rem; }
.verdict-bad { background: #fdecea; border-left: 4px solid #e53935; padding: .5rem .8rem; font-weight: bold; }
.verdict-ok { background: #e8f5e9; border-left: 4px solid #4caf50; padding: .5rem .8rem; font-weight: bold; }
.scroll { overflow-x: auto; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _is_text(col: str) -> bool:
    """Columns of prose: allowed to wrap."""
    return col in ("reason", "error", "value", "note", "loaded layers", "checkpointing evidence", "command")


_NUMBER = re.compile(r"^[-+]?[0-9][0-9,.]*(\s|%|$)")


def _numeric_columns(b: TableBlock) -> set[int]:
    """Columns whose filled cells all start with a number: right-aligned, like figures."""
    out = set()
    for i in range(len(b.headers)):
        vals = [r[i] for r in b.rows if i < len(r) and r[i] not in ("-", "")]
        if vals and all(_NUMBER.match(v) for v in vals):
            out.add(i)
    return out


def to_html(title: str, blocks: Sequence[Block], base: Path, *, embed: bool = True) -> str:
    """A standalone page; figures are read from ``base / png`` and embedded when ``embed``."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            level = min(6, b.level)
            anchor = "".join(ch if ch.isalnum() else "-" for ch in b.text.lower()).strip("-")
            out.append(f'<h{level} id="{e(anchor)}">{e(b.text)}</h{level}>')
        elif isinstance(b, Para):
            cls = f' class="{b.kind}"' if b.kind != "text" else ""
            out.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, TableBlock):
            if b.caption:
                out.append(f"<p>{e(b.caption)}</p>")
            if not b.rows:
                out.append("" if b.caption else "<p>(none)</p>")
                continue
            num = _numeric_columns(b)
            cls = [' class="num"' if i in num else ' class="text"' if _is_text(h) else ""
                   for i, h in enumerate(b.headers)]
            out.append('<div class="scroll"><table><thead><tr>'
                       + "".join(f"<th{c}>{e(h)}</th>" for c, h in zip(cls, b.headers)) + "</tr></thead><tbody>")
            for r in b.rows:
                out.append("<tr>" + "".join(f"<td{c}>{e(v)}</td>" for c, v in zip(cls, r)) + "</tr>")
            out.append("</tbody></table></div>")
        elif isinstance(b, FigureBlock):
            src = _data_uri(base / b.png) if embed else b.png
            svg = f' <a href="{e(b.svg)}">SVG</a>' if b.svg else ""
            out.append(f'<figure><img src="{src}" alt="{e(b.alt)}">'
                       f"<figcaption>{e(b.caption)}{svg}</figcaption></figure>")
        elif isinstance(b, Code):
            out.append(f"<pre>{e(b.text)}</pre>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
