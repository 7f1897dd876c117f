"""The evaluation report: one self-contained HTML page for a quality engineer, plus its plots as PNG files.

:func:`write_report` takes plain arrays (probabilities, true labels, paths), so it can be fed from
``evaluate`` or from synthetic data in tests, and calls one function per section in page order. The numbers
behind the curves come from :mod:`defectscope.evaluation.curves` and are written to ``report_metrics.json``
beside the page, so they can be merged into ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.evaluation.curves import curve_metrics, raw_escape, report_metrics
from defectscope.evaluation.report import charts
from defectscope.evaluation.report.drift import drift_section
from defectscope.evaluation.report.html import STYLE, esc, section
from defectscope.evaluation.report.images import Thumbs, gallery, gradcam_section
from defectscope.evaluation.report.summary import headline, per_class_table, purity_table

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
REPORT_METRICS_FILE = "report_metrics.json"
PLOTS_DIR = "plots"
THUMB_SIZE = 96  # thumbnail side when no model spec says what the model saw

__all__ = ["REPORT_FILE", "REPORT_METRICS_FILE", "report_from_run", "report_metrics", "write_report"]


def write_report(
    run: Path | None,
    *,
    metrics: dict[str, Any],
    probs: np.ndarray,
    y_true: np.ndarray,
    paths: list[str],
    classes: list[str],
    out_dir: Path,
    model: Any = None,
    spec: dict[str, Any] | None = None,
    policy: Any = None,
    gradcam_per_class: int = 3,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained), ``out_dir/plots/*.png`` and ``out_dir/report_metrics.json``.

    ``metrics``: what ``classification_metrics`` returns (optionally with ``policy`` from
    ``apply_policy_metrics``); ``probs``: uncalibrated softmax probabilities (N, K) in ``classes`` order,
    rows matching ``y_true`` (class indices) and ``paths``; ``run``: the run directory, read only for
    ``history.csv`` and the Drift evaluation files (None: no training curves); ``model``/``spec`` (the run's)
    enable Grad-CAM and set the thumbnail size; ``policy``: a :class:`~defectscope.decision.policy.Policy`
    whose temperature and review band place the operating point on the review trade-off curve.
    Returns the path of the HTML file.
    """
    out_dir = Path(out_dir)
    plots_dir = out_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    classes = list(classes)
    numbers = report_metrics(probs, y_true, classes)
    _, curves = curve_metrics(probs, y_true, classes)
    size = int(spec["image_size"]) if spec else THUMB_SIZE
    thumbs = Thumbs(paths, size, (spec or {}).get("resize", "squash"))

    sections = [
        section("1. Headline", "macro-F1 and the worst class say more than accuracy when one class dominates; "
                "escape (defective passed as good) is the costly error, overkill (good rejected) the cheaper one. "
                "Brackets are confidence intervals: with few test images the true rate can lie anywhere inside "
                "them.", headline(metrics, raw_escape(probs, y_true, classes))),
        section("2. Per-class results", "precision: of the images called this class, the share that really are; "
                "recall: of the images of this class, the share found; support: test images of the class. The "
                "worst class is shaded.", per_class_table(metrics)),
        charts.confusion(metrics, classes, plots_dir),
        charts.roc_pr(curves, numbers, plots_dir),
        charts.calibration(numbers, plots_dir),
        charts.training(run, plots_dir),
    ]
    gallery_html, mistakes = gallery(probs, y_true, classes, thumbs, plots_dir)
    sections.append(section(
        "7. Gallery", "confident mistakes are often wrong labels or a defect type the model has not learned; "
        "correct but unsure images are the borderline cases a person should review.", gallery_html))
    cam_html, cam_info = gradcam_section(model, probs, y_true, classes, thumbs, mistakes, gradcam_per_class,
                                         plots_dir)
    sections.append(section(
        "8. Grad-CAM: where the model looked", "a heatmap on a defect means the model decided for the right "
        "reason; a heatmap on the background or image border means it may rely on something that will not hold "
        "on the line.", cam_html))
    sections.append(charts.review(probs, y_true, policy, plots_dir, purity_table(policy, metrics)))
    drift_html, drift_info = drift_section(run, metrics, policy, plots_dir)
    sections.append(section(
        "10. Drift: images unlike the training images", "a Drift score says how unlike the training images a "
        "part is; above the policy's threshold the part is set aside as Drift instead of being classified, "
        "because the model's answer on such a part means little. The false-flag rate is the price: normal "
        "parts set aside by mistake.", drift_html))

    numbers["gradcam"] = cam_info
    numbers["drift"] = drift_info
    title = f"defectscope evaluation report{(' - ' + Path(run).name) if run is not None else ''}"
    what = metrics.get("evaluated_on", "")
    arch = metrics.get("architecture") or (spec or {}).get("architecture", "")
    intro = "; ".join(x for x in (f"{arch} on {what}" if arch and what else arch or what,
                                  f"{len(y_true)} images, {len(classes)} classes") if x)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n"
            f"<p>{esc(intro)}</p>\n" + "".join(sections) + "</body></html>\n")
    html_path = out_dir / REPORT_FILE
    html_path.write_text(page, encoding="utf-8")
    (out_dir / REPORT_METRICS_FILE).write_text(json.dumps(numbers, indent=2))
    log.debug(f"report written: {html_path}")  # the caller (evaluate) says where, once
    return html_path


def report_from_run(run: str | Path, out_dir: str | Path | None = None, *, gradcam_per_class: int = 3) -> Path:
    """Rebuild the report from a run's ``evaluation/`` files (after ``evaluate``), loading model and policy.

    Probabilities come from ``logits.npy`` (exact) when present, else the rounded ``p_<class>`` columns
    of ``predictions.csv``.
    """
    import pandas as pd

    from defectscope.decision.policy import Policy, softmax
    from defectscope.rundir import EVALUATION, LOGITS, METRICS, PREDICTIONS, Run

    run = Run(run)
    ev = run.file(EVALUATION)
    metrics = json.loads((ev / METRICS).read_text())
    pred = pd.read_csv(ev / PREDICTIONS, dtype={"label": str, "predicted": str}, keep_default_na=False)
    classes = run.classes
    if (ev / LOGITS).is_file():
        probs = softmax(np.load(ev / LOGITS))
    else:
        probs = pred[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    y_true = run.labels(pred)
    policy = Policy.from_dict(run.policy) if run.policy is not None else None
    return write_report(run.path, metrics=metrics, probs=probs, y_true=y_true, paths=list(pred["path"]),
                        classes=classes, out_dir=Path(out_dir) if out_dir else ev, model=run.model(), spec=run.spec,
                        policy=policy, gradcam_per_class=gradcam_per_class)
