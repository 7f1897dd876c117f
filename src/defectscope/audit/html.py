"""The audit's self-contained HTML page: plots and thumbnails inline, every finding naming its files."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from defectscope.data.images import ImageDecodeError, load_gray

MAX_GROUPS = 30  # per section in the page; the CSV files hold them all


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(path: str) -> str:
    try:
        gray = load_gray(path, 72)
    except (ImageDecodeError, ValueError, OSError):
        return ""
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" width="72" height="72">'


def _plots(result: dict[str, Any], table: pd.DataFrame) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    counts = pd.crosstab(table["label"], table["split"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    counts.plot.bar(stacked=True, ax=ax)
    ax.set_ylabel("images")
    ax.set_title("images per class and split")
    plots.append(("Class counts", _png(fig)))

    sizes = result["sizes"]["most_common"]
    if sizes:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        ax.scatter([s["width"] for s in sizes], [s["height"] for s in sizes],
                   s=[20 + 200 * s["count"] / max(x["count"] for x in sizes) for s in sizes], alpha=0.6)
        ax.set_xlabel("width")
        ax.set_ylabel("height")
        ax.set_title(f"image sizes ({result['sizes']['distinct']} distinct; top 20)")
        plots.append(("Image sizes", _png(fig)))

    tested = [a for a in result["metadata_association"] if a.get("cramers_v") is not None]
    if tested:
        fig, ax = plt.subplots(figsize=(6, 0.4 + 0.35 * len(tested)))
        ax.barh([a["column"] for a in tested][::-1], [a["cramers_v"] for a in tested][::-1])
        ax.axvline(0.3, color="red", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_xlabel("Cramér's V with the label (bias-corrected)")
        plots.append(("Metadata vs label", _png(fig)))
    return plots


def _groups(title: str, groups: list[list[dict[str, str]]], note: str) -> str:
    if not groups:
        return f"<h2>{html.escape(title)}</h2><p>None found. {html.escape(note)}</p>"
    parts = [f"<h2>{html.escape(title)} ({len(groups)})</h2><p>{html.escape(note)}</p>"]
    for g in groups[:MAX_GROUPS]:
        cells = "".join(
            f"<td>{_thumb(f['path'])}<br>{html.escape(f['name'])}<br><b>{html.escape(f['label'])}</b> "
            f"({html.escape(f['split'])})</td>" for f in g[:8])
        parts.append(f"<table class='g'><tr>{cells}</tr></table>")
    if len(groups) > MAX_GROUPS:
        parts.append(f"<p>... {len(groups) - MAX_GROUPS} more in the CSV files.</p>")
    return "".join(parts)


def write_html(result: dict[str, Any], table: pd.DataFrame, out: Path) -> Path:
    esc = html.escape
    body = [f"<h1>Data audit: {esc(result['data'])}</h1>", "<ul>"]
    body += [f"<li>{esc(line)}</li>" for line in result["summary"]]
    body.append(f"</ul><p>Splits: {esc(result['split_note'])}. Features for the label check: "
                f"{esc(result['settings']['features_used'])}.</p>")
    for title, src in _plots(result, table):
        body.append(f"<h2>{esc(title)}</h2><img src='{src}'>")
    counts = pd.DataFrame(result["classes"]).T
    body.append("<h2>Counts</h2>" + counts.to_html(border=0))
    body.append("<h2>Modes and bit depths</h2><p>" + esc(str(result["modes"])) + " / bit depths "
                + esc(str(result["bit_depths"])) + "</p>")
    clusters = pd.DataFrame(result["sizes"]["clusters"])
    if not clusters.empty:
        body.append("<h2>Size clusters</h2>" + clusters.to_html(border=0, index=False))
    unread = pd.DataFrame(result["unreadable"])
    body.append("<h2>Unreadable or missing</h2>" + (unread.to_html(border=0, index=False) if not unread.empty
                                                     else "<p>None.</p>"))
    body.append(_groups("Leakage: exact duplicates across splits", result["leakage"]["exact"],
                        "The same file in more than one split inflates test metrics."))
    body.append(_groups("Leakage: near duplicates across splits", result["leakage"]["near"],
                        "Near-identical images in more than one split."))
    body.append(_groups("Exact duplicates", result["exact_duplicates"], "Byte-identical files (SHA-256)."))
    body.append(_groups("Near duplicates", result["near_duplicates"],
                        f"pHash within {result['settings']['near_phash']} bits and dHash within "
                        f"{result['settings']['near_dhash']} bits of 64."))
    body.append(_groups("Duplicates with different labels", result["conflicting_labels"], ""))
    sus = result["label_suspects"]
    body.append(f"<h2>Labels that look wrong ({len(sus)})</h2><p>Each image's {result['settings']['k']} nearest "
                "neighbours in a frozen feature space mostly carry the suggested label. Check by eye; "
                "the audit changes nothing.</p>")
    for x in sus[:MAX_GROUPS * 2]:
        body.append(f"<p>{_thumb(x['path'])} {esc(x['name'])}: labelled <b>{esc(x['label'])}</b>, neighbours "
                    f"say <b>{esc(x['suggested'])}</b> ({x['share']:.0%})</p>")
    body.append("<h2>Metadata association</h2>")
    for a in result["metadata_association"]:
        v = a.get("cramers_v")
        body.append(f"<h3>{esc(a['column'])}: V = {v if v is not None else '-'}</h3>"
                    f"<p>{esc(a.get('note', ''))}</p>")
        if a.get("table"):
            body.append(pd.DataFrame(a["table"]).T.fillna(0).astype(np.int64).to_html(border=0))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>defectscope audit</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:1em auto}table{border-collapse:collapse}"
            "td,th{padding:3px 6px;font-size:13px}table.g td{text-align:center;vertical-align:top}"
            "</style></head><body>" + "\n".join(body) + "</body></html>")
    path = out / "audit.html"
    path.write_text(page)
    return path
