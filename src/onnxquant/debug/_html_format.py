"""Small HTML building blocks of the comparison report: number formatting, escaped tables and
the inline style sheet (see :mod:`onnxquant.debug.html`)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence

__all__ = ["esc", "fmt_db", "fmt_num", "fmt_pct", "db_class", "table", "details", "CSS"]

NA = "n/a"


def esc(text: object) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def _special(x: float | None) -> str:
    """``"n/a"`` for None/NaN, ``"−∞"``/``"+∞"`` for infinities (not for finite numbers)."""
    if x is None or math.isnan(x):
        return NA
    return "\u2212\u221e" if x < 0 else "+\u221e"


def fmt_db(x: float | None, digits: int = 1) -> str:
    """A decibel value: ``"23.4 dB"``, ``"n/a"``, ``"−∞"`` or ``"+∞"``."""
    if x is None or not math.isfinite(x):
        return _special(x)
    return f"{x:.{digits}f} dB".replace("-", "\u2212")


def fmt_num(x: float | None, digits: int = 4) -> str:
    """A plain number with ``digits`` decimals (``"n/a"``/``"−∞"`` when not finite)."""
    if x is None or not math.isfinite(x):
        return _special(x)
    return f"{x:.{digits}f}".replace("-", "\u2212")


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: ``0.984`` -> ``"98.4%"``."""
    if x is None or not math.isfinite(x):
        return _special(x)
    return f"{100 * x:.{digits}f}%"


def db_class(x: float | None) -> str:
    """CSS class of an SQNR cell: ``bad`` below 10 dB, ``warn`` below 20 dB, else empty."""
    if x is None or math.isnan(x):
        return ""
    if x < 10:
        return "bad"
    return "warn" if x < 20 else ""


def table(headers: Sequence[str], rows: Iterable[Sequence[str | tuple[str, str]]],
          numeric: Sequence[int] = ()) -> str:
    """An HTML table; ``rows`` hold pre-escaped cells (or ``(html, css_class)`` pairs) and the
    columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th class=\"num\">{esc(h)}</th>" if i in numeric else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text, cls = cell if isinstance(cell, tuple) else (cell, "")
            classes = " ".join(c for c in ("num" if i in numeric else "", cls) if c)
            cells.append(f"<td class=\"{classes}\">{text}</td>" if classes else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def details(summary: str, content: str) -> str:
    """A collapsible ``<details>`` block (``summary`` is escaped, ``content`` is HTML)."""
    return f"<details><summary>{esc(summary)}</summary>{content}</details>"


CSS = """
:root { --good:#1e8e3e; --good-bg:#e6f4ea; --warn:#b06000; --warn-bg:#fef7e0;
        --bad:#c5221f; --bad-bg:#fce8e6; --line:#dadce0; --muted:#5f6368; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       font-size: 15px; line-height: 1.45; color: #202124; margin: 0; background: #f8f9fa; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 12px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid
     var(--line); }
h3 { font-size: 16px; margin: 20px 0 6px; }
p.note { color: var(--muted); margin: 4px 0 12px; font-size: 14px; }
code, .name { font-family: "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
              font-size: 13px; overflow-wrap: break-word; }
code { background: #f1f3f4; padding: 1px 4px; border-radius: 3px; }
code .opt { white-space: nowrap; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.verdict { border: 2px solid; border-radius: 8px; padding: 12px 18px; margin: 20px 0; }
.verdict.good { border-color: var(--good); background: var(--good-bg); }
.verdict.doubtful { border-color: var(--warn); background: var(--warn-bg); }
.verdict.bad { border-color: var(--bad); background: var(--bad-bg); }
.verdict h2 { border: none; margin: 0 0 8px; padding: 0; }
.verdict table { background: #fff; }
.verdict p.advice { font-size: 16px; margin: 10px 0 4px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff;
         font-size: 12px; font-weight: 600; text-transform: uppercase; }
.badge.good { background: var(--good); } .badge.doubtful { background: var(--warn); }
.badge.bad { background: var(--bad); }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left;
         vertical-align: top; }
th { background: #f1f3f4; font-weight: 600; position: sticky; top: 0; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.bad { color: var(--bad); font-weight: 600; } td.warn { color: var(--warn); }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 12px 0; } figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; overflow-wrap: anywhere; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 8px 24px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } main { padding: 12px; } }
details { margin: 8px 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; }
details > summary { cursor: pointer; font-weight: 600; }
details .scroll { max-height: 600px; overflow: auto; }
ul.names { columns: 2; font-size: 13px; }
"""
