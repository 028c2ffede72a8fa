"""Plain-text tables and unit formatting for terminal output. Pure module.

Units are converted only here (and in the reporter): records store bytes and seconds.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

GIB = 1024 ** 3


def fmt_gib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def memory_of(rec: dict[str, Any]) -> tuple[str, int | None]:
    """('VRAM', bytes) on GPU cells, ('RSS', bytes) on CPU cells: what the cell's peak is
    (None where the record holds no number)."""
    vram, rss = rec.get("peak_vram_bytes"), rec.get("peak_rss_bytes")
    if isinstance(vram, (int, float)):
        return "VRAM", vram
    return "RSS", rss if isinstance(rss, (int, float)) else None


def status_text(rec: dict[str, Any]) -> str:
    st = str(rec.get("status", "?"))
    if st == "oom":
        return "OOM"
    return st


def quality_flags(rec: dict[str, Any]) -> str:
    """Short marks for a cell whose speed figures are not to be compared."""
    flags = []
    if rec.get("stable") is False:
        flags.append("unstable")
    if rec.get("host_bound"):
        flags.append("host-bound")
    if rec.get("host_busy"):
        flags.append("host busy")
    if rec.get("repeat"):
        flags.append(f"repeat {rec['repeat']}")
    return ", ".join(flags)


def summary_rows(records: Iterable[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in records:
        kind, mem = memory_of(r)
        rate = r.get("tokens_per_s") if r.get("status") == "ok" else None
        rows.append([r.get("cell_id", "?"), status_text(r), f"{fmt_gib(mem)} {kind}" if mem is not None else "-",
                     fmt_rate(rate if isinstance(rate, (int, float)) else None), quality_flags(r)])
    return rows


SUMMARY_HEADERS = ["cell", "status", "peak memory", "tokens/s", "note"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """Fixed-width text table; ``align`` is one 'l'/'r' per column (default: first left)."""
    cols = len(headers)
    align = align or ("l" + "r" * (cols - 1))
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(cols)]

    def fmt(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    out = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells[1:]]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
