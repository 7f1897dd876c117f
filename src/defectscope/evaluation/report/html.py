"""HTML building blocks of the report page: escaping, number formats, embedded images, sections."""

from __future__ import annotations

import base64
import html
import math
from typing import Any

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
.how{color:#555;font-style:italic;margin:.3em 0 1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
tr.worst td{background:#fde8e8}
.big{font-size:1.15em}.note{background:#fff7e0;border-left:4px solid #f0b400;padding:.4em .8em}
img{max-width:100%;height:auto;border:1px solid #eee}
.headline td:nth-child(2){font-weight:bold}.headline td:nth-child(3){text-align:left;color:#444}
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def section(title: str, how: str, body: str) -> str:
    return f'<section><h2>{esc(title)}</h2><p class="how">How to read this: {esc(how)}</p>\n{body}</section>\n'


def rate_row(name: str, r: dict[str, Any] | None, sentence: str, *, level: bool = True) -> str:
    """A rate with its interval; ``level=False`` when the table states the interval level once for all rows."""
    if not r or r.get("rate") is None:
        return ""
    lo, hi = r["interval"]
    conf = f" at {int(round(100 * r.get('confidence', 0.95)))}%" if level else ""
    value = f"{pct(r['rate'])} <small>[{pct(lo)}, {pct(hi)}]{conf}</small>"
    return f"<tr><td>{esc(name)}</td><td>{value}</td><td>{esc(sentence)}</td></tr>"
