"""``defectscope review export``: people's labels from the results store as a training manifest, and the
review conflicts it will not pass on silently.

The CSV has ``filename`` (absolute path of the reviewed image: the service's content-addressed copy or the
sorter's filed file) and ``label`` (the latest review of each decision), which ``defectscope train --data
corrections.csv`` reads like any manifest; the other columns (decision id, what the model said, who and
when, ``conflict``) ride along as metadata.

A *conflict*: people disagree about one image. Either the reviewers of one decision disagree (each reviewer's
latest label counts, so a person correcting their own label is no conflict), or one image file (the same bytes,
content-addressed) was reviewed under two decisions with different labels. Every review is kept in the store;
the export leaves conflicting images out (``conflicts="drop"``, the default, and says how many), or writes
every label of them marked ``conflict=1`` (``conflicts="mark"``), which :func:`defectscope.data.table.load_table`
then refuses until someone says which label wins.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from defectscope import labels
from defectscope.station.store import Store

__all__ = ["MANIFEST_COLUMNS", "conflicts_of", "export_corrections", "export_report"]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("filename", "label", "decision_id", "model_decision", "model_id", "reviewer", "reviewed_at",
                    "conflict")


def conflicts_of(reviews: list[dict[str, Any]]) -> dict[int, list[dict[str, str]]]:
    """The decisions whose reviewers disagree, each with every reviewer's latest label (reviews in id order)."""
    latest: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in reviews:
        latest[r["decision_id"]][r["reviewer"]] = r
    return {d: [{"reviewer": who, "label": r["label"], "time": r["time"]} for who, r in by.items()]
            for d, by in latest.items() if len({r["label"] for r in by.values()}) > 1}


def export_corrections(db: str | Path, out: str | Path, *, include_drift: bool = False,
                       conflicts: str = "drop") -> int:
    """Write the manifest (see :func:`export_report`); returns the number of rows written."""
    return export_report(db, out, include_drift=include_drift, conflicts=conflicts)["rows"]


def export_report(db: str | Path, out: str | Path, *, include_drift: bool = False,
                  conflicts: str = "drop") -> dict[str, int]:
    """Write one row per reviewed decision whose image still exists; returns the counts (``rows``, ``drift``
    left out, ``missing`` images, ``conflicting`` images and the ``conflict_rows`` dropped or marked).

    Decisions labelled ``Drift`` are left out unless ``include_drift``: Drift is not a class the model can
    learn from a handful of examples, and a manifest with it would add a class to the next training run.
    """
    if conflicts not in ("drop", "mark"):
        raise ValueError(f"conflicts must be 'drop' or 'mark', got {conflicts!r}")
    with Store(db, create=False) as store:
        reviewed, disputed = store.reviewed(), conflicts_of(store.reviews())
    counts = dict.fromkeys(("rows", "drift", "missing", "conflicting", "conflict_rows"), 0)
    rows: list[tuple[str, dict[str, Any], str]] = []  # (image, decision row, label)
    for r in reviewed:
        image = r.get("image_path") or r.get("destination")
        if not image or not Path(image).is_file():
            counts["missing"] += 1
            log.warning("decision %s: image %s is gone; left out", r["id"], image)
            continue
        image = str(Path(image).absolute())
        for label in sorted({x["label"] for x in disputed[r["id"]]}) if r["id"] in disputed else [r["label"]]:
            rows.append((image, r, label))
    labels_of: dict[str, set[str]] = defaultdict(set)
    for image, _, label in rows:
        labels_of[image].add(label)
    clashing = {image for image, found in labels_of.items() if len(found) > 1}
    counts["conflicting"] = len(clashing)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for image, r, label in rows:
            if label == labels.DRIFT and not include_drift:
                counts["drift"] += 1
                continue
            conflict = image in clashing
            counts["conflict_rows"] += conflict
            if conflict and conflicts == "drop":
                continue
            writer.writerow([image, label, r["id"], r["decision"], r["model_id"], r["reviewer"], r["reviewed_at"],
                             int(conflict)])
            counts["rows"] += 1
    log.info("%d corrections written to %s (%d Drift left out, %d images missing, %d images with conflicting "
             "labels: %d rows %s)", counts["rows"], out, counts["drift"], counts["missing"], counts["conflicting"],
             counts["conflict_rows"], "left out" if conflicts == "drop" else "marked conflict=1")
    return counts
