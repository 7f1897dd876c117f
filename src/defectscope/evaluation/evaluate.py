"""``defectscope.evaluate``: score a run on its test split or on another labelled dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defectscope.data.table import DataError, load_table
from defectscope.decision.calibrate import calibration_split, drift_scores_for, drift_stages
from defectscope.decision.outcomes import apply_policy_metrics
from defectscope.decision.policy import Policy, decide, relative_drift
from defectscope.metrics import classification_metrics, format_metrics
from defectscope.rundir import EVALUATION, LOGITS, METRICS, PREDICTIONS, Run

log = logging.getLogger(__name__)


def load_policy(run: Run) -> Policy | None:
    """The run's decision policy, or None before ``calibrate``."""
    data = run.policy
    return Policy.from_dict(data) if data is not None else None


def format_policy_metrics(m: dict[str, Any]) -> str:
    """After the decision policy: what passes, what is rejected, what a person must look at."""
    levels = {r["confidence"] for r in m.values() if isinstance(r, dict) and "confidence" in r}
    stated = f"; [brackets]: {next(iter(levels)):.0%} confidence intervals" if len(levels) == 1 else ""
    lines = [f"after the decision policy (RUN/policy.json{stated}):"]
    for key, what in (("automation", "automation rate (decided without a person)"),
                      ("escape", "escape rate (defective passed as good)"),
                      ("nuisance_escape", "nuisance escape rate (reported, not capped)"),
                      ("overkill", "overkill rate (good rejected automatically)")):
        r = m.get(key)
        if r and r.get("rate") is not None:
            lo, hi = r["interval"]
            lines.append(f"  {what:<40} {r['rate']:.4f}  [{lo:.4f}, {hi:.4f}]  ({r['count']}/{r['of']})")
    lines.append(f"  {'review rate':<40} {m['review_rate']:.4f}")
    if m.get("drift_rate"):
        lines.append(f"  {'drift rate':<40} {m['drift_rate']:.4f}")
    auto = m.get("auto") or {}
    if auto:
        lines.append(f"  {'auto-decided accuracy / macro-F1':<40} {auto.get('accuracy', 0):.4f} / "
                     f"{auto.get('macro_f1', 0):.4f}  ({m['n_auto']} of {m['n']} images)")
    if m.get("pwa") is not None:
        lines.append(f"  {'expected cost per image / PWA':<40} {m['expected_cost_per_image']:.2f} / {m['pwa']:.4f}")
    return "\n".join(lines)


def evaluate(
    run: str | Path | Run,
    data: str | Path | None = None,
    *,
    split: str = "test",
    out: str | Path | None = None,
    skip_bad: bool = False,
    report: bool = True,
    gradcam_per_class: int = 3,
    **manifest_options: Any,
) -> dict[str, Any]:
    """Score the run's model; writes ``metrics.json`` and ``predictions.csv`` and returns the metrics.

    Without ``data`` the run's own ``split`` of its dataset table is used. With ``data`` (a folder,
    manifest or 'elpv') every image is scored; its labels must be among the run's classes.
    ``manifest_options`` are ``image_root``, ``path_column``, ``label_column``, ``label_conflicts`` for a
    CSV. With ``report``
    a self-contained ``report.html`` (curves, calibration, gallery, Grad-CAM) is written beside them and
    its curve metrics (ROC/PR AUCs, ECE) are added to ``metrics.json``.

    >>> metrics = evaluate("runs/first")  # doctest: +SKIP
    >>> metrics["macro_f1"]  # doctest: +SKIP
    """
    import torch

    unknown = set(manifest_options) - {"image_root", "path_column", "label_column", "label_conflicts"}
    if unknown:
        raise TypeError(f"evaluate() got unexpected options {sorted(unknown)}; manifest options are "
                        "image_root, path_column, label_column")
    if manifest_options and data is None:
        raise ValueError(f"{', '.join(sorted(manifest_options))} only apply with data= (another dataset)")
    run = run if isinstance(run, Run) else Run(run)
    model, spec, cfg = run.model(), run.spec, run.config
    classes = run.classes
    policy = load_policy(run)
    if data is None:
        table, what = _split_table(run, split, policy)
    else:
        table, _ = load_table(data, classes=classes, skip_bad=skip_bad, **manifest_options)
        what = str(data)
    table, images = run.images(table, skip_bad=skip_bad)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    logits, drift_score = _logits_and_drift(run, model, images, table, policy)
    probs = torch.softmax(logits, dim=1).numpy()
    index = {c: i for i, c in enumerate(classes)}
    y_true = table["label"].map(index).to_numpy()
    y_pred = probs.argmax(1)

    metrics = classification_metrics(y_true, y_pred, classes)
    metrics["evaluated_on"] = what
    metrics["architecture"] = spec["architecture"]
    decisions = None
    if policy is not None:
        logits_np = logits.numpy()
        metrics["policy"] = apply_policy_metrics(y_true, logits_np, policy, classes, inputs="logits",
                                                 drift_score=drift_score)
        decided = decide(logits_np, policy, inputs="logits", drift_score=drift_score)
        decisions = decided.labels, decided.reasons
    out_dir = Path(out) if out else run.file(EVALUATION)
    out_dir.mkdir(parents=True, exist_ok=True)
    if report:
        from defectscope.evaluation.report import report_metrics

        metrics["curves"] = report_metrics(probs, y_true, classes)
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    shown = drift_score
    if drift_score is not None and policy is not None and policy.drift_threshold is not None:
        shown = relative_drift(drift_score, policy.drift_threshold)  # 1.0 = the Drift line, as predict prints it
    _write_predictions(out_dir, table, classes, probs, decisions, shown)
    np.save(out_dir / LOGITS, logits.numpy())
    if report:
        from defectscope.evaluation.report import write_report

        html = write_report(run.path, metrics=metrics, probs=probs, y_true=y_true, paths=list(table["path"]),
                            classes=classes, out_dir=out_dir, model=model, spec=spec, policy=policy,
                            gradcam_per_class=gradcam_per_class)
        log.info(f"report: {html}")
    _log_evaluation(metrics, spec, what, out_dir)
    return metrics


def _split_table(run: Run, split: str, policy: Policy | None) -> tuple[pd.DataFrame, str]:
    """The rows of the run's ``split`` to score, and how to name them."""
    cfg = run.config
    table = run.table
    rows = (table["split"] == split).to_numpy()
    what = f"{split} split of {cfg.data.source}"
    if policy is not None and split == "test":
        # Score only the images the policy's thresholds were not fitted on.
        calib, held_out = calibration_split(table, int(policy.calibration.get("seed", cfg.seed)))
        if (rows & calib).any():
            rows = held_out
            what += " (the half not used for calibration)"
    table = table[rows].reset_index(drop=True)
    if table.empty:
        raise DataError(f"{run.path}: the {split!r} split is empty; pass --data to evaluate on other images")
    return table, what


def _logits_and_drift(run: Run, model, images: np.ndarray, table: pd.DataFrame, policy: Policy | None):
    """(logits as a float tensor, the policy's Drift score per image or None)."""
    import torch

    from defectscope.models.inference import predict_logits

    if policy is not None and policy.drift:
        from defectscope.decision.drift.rule import policy_forward

        features, logits_np, maps = policy_forward(model, images, drift_stages(policy), metadata=run.metadata(table))
        drift_score = drift_scores_for(run, policy, features, logits_np, maps, images)
        return torch.from_numpy(logits_np).float(), drift_score
    return predict_logits(model, images, metadata=run.metadata(table)), None


def _write_predictions(out_dir: Path, table: pd.DataFrame, classes: list[str], probs: np.ndarray,
                       decisions: tuple[np.ndarray, np.ndarray] | None, drift_score: np.ndarray | None) -> None:
    predictions = pd.DataFrame({
        "path": table["path"], "source": table["source"], "label": table["label"],
        "predicted": [classes[i] for i in probs.argmax(1)], "confidence": probs.max(1).round(6),
    })
    if decisions is not None:
        predictions["decision"], predictions["reason"] = decisions
    if drift_score is not None:
        predictions["drift_score"] = np.round(drift_score, 6)
    for i, name in enumerate(classes):
        predictions[f"p_{name}"] = probs[:, i].round(6)
    predictions.to_csv(out_dir / PREDICTIONS, index=False)


def _log_evaluation(metrics: dict[str, Any], spec: dict[str, Any], what: str, out_dir: Path) -> None:
    log.info(f"evaluated {spec['architecture']} on {what}")
    log.info(format_metrics(metrics))
    if "policy" in metrics:
        log.info("")
        log.info(format_policy_metrics(metrics["policy"]))
    log.info(f"written: {out_dir / METRICS}, {out_dir / PREDICTIONS}")
