"""``defectscope review export``: people's labels from the results store as a training manifest.

The CSV has ``filename`` (absolute path of the reviewed image: the service's content-addressed copy or the
sorter's filed file) and ``label`` (the latest review of each decision), which ``defectscope train --data
corrections.csv`` reads like any manifest; the other columns (decision id, what the model said, who and
when) ride along as metadata.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from defectscope import labels
from defectscope.station.store import Store

__all__ = ["MANIFEST_COLUMNS", "export_corrections"]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("filename", "label", "decision_id", "model_decision", "model_id", "reviewer", "reviewed_at")


def export_corrections(db: str | Path, out: str | Path, *, include_drift: bool = False) -> int:
    """Write one row per reviewed decision whose image still exists; returns the number of rows.

    Decisions labelled ``Drift`` are left out unless ``include_drift``: Drift is not a class the model can
    learn from a handful of examples, and a manifest with it would add a class to the next training run.
    """
    with Store(db, create=False) as store:
        reviewed = store.reviewed()
    n = missing = drift = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for r in reviewed:
            if r["label"] == labels.DRIFT and not include_drift:
                drift += 1
                continue
            image = r.get("image_path") or r.get("destination")
            if not image or not Path(image).is_file():
                missing += 1
                log.warning("decision %s: image %s is gone; left out", r["id"], image)
                continue
            writer.writerow([str(Path(image).absolute()), r["label"], r["id"], r["decision"], r["model_id"],
                             r["reviewer"], r["reviewed_at"]])
            n += 1
    log.info("%d corrections written to %s (%d Drift left out, %d images missing)", n, out, drift, missing)
    return n
