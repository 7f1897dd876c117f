"""The evaluation report: one self-contained HTML page for a quality engineer, plus its plots as PNG files.

:func:`write_report` takes plain arrays (probabilities, true labels, paths), so it can be fed from
``evaluate`` or from synthetic data in tests. The numbers behind the curves (per-class ROC AUC,
average precision, PR AUC, expected calibration error) are computed here by :func:`report_metrics`
and written to ``report_metrics.json`` beside the page, so they can be merged into ``metrics.json``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPORT_FILE = "report.html"
REPORT_METRICS_FILE = "report_metrics.json"
PLOTS_DIR = "plots"
ECE_BINS = 15
GALLERY_SIZE = 12
THUMB_SIZE = 96  # thumbnail side when no model spec says what the model saw


# ---------------------------------------------------------------- numbers


def curve_metrics(
    probs: np.ndarray, y_true: np.ndarray, classes: Sequence[str]
) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Any]]]]:
    """One-vs-rest ROC and precision-recall per class: (summary numbers, curve arrays for plotting).

    A class with no positives or no negatives among ``y_true`` has no defined curve: its numbers are
    None and ``skipped[class]`` says why. Macro averages cover the classes that have a curve.
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    y_true = np.asarray(y_true, dtype=int)
    roc_auc: dict[str, float | None] = {}
    ap: dict[str, float | None] = {}
    pr_auc: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    curves: dict[str, dict[str, dict[str, Any]]] = {"roc": {}, "pr": {}}
    for k, name in enumerate(classes):
        positive = y_true == k
        if not positive.any() or positive.all():
            roc_auc[name] = ap[name] = pr_auc[name] = None
            skipped[name] = "no test images of this class" if not positive.any() else "no images of other classes"
            continue
        score = probs[:, k]
        fpr, tpr, _ = roc_curve(positive, score)
        precision, recall, _ = precision_recall_curve(positive, score)
        roc_auc[name] = float(auc(fpr, tpr))
        ap[name] = float(average_precision_score(positive, score))
        pr_auc[name] = float(auc(recall, precision))
        curves["roc"][name] = {"fpr": fpr, "tpr": tpr, "auc": roc_auc[name]}
        curves["pr"][name] = {"precision": precision, "recall": recall, "ap": ap[name]}

    def mean(d: dict[str, float | None]) -> float | None:
        vals = [v for v in d.values() if v is not None]
        return float(np.mean(vals)) if vals else None

    summary = {
        "roc_auc": roc_auc, "average_precision": ap, "pr_auc": pr_auc,
        "macro_roc_auc": mean(roc_auc), "macro_average_precision": mean(ap), "macro_pr_auc": mean(pr_auc),
        "curves_skipped": skipped,
    }
    return summary, curves


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Equal-width bins over the top-class confidence, each ``(lower, upper]`` (the first also holds 0).

    Per bin: image count, accuracy and mean confidence (None for an empty bin).
    """
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true, dtype=int)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted on the inner edges with side="left" puts a confidence equal to an edge in the bin
    # below it, i.e. (lower, upper], without the float trouble of ceil(conf * n_bins).
    which = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(which, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct.astype(float), minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    return {
        "lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": count.astype(int).tolist(),
        "accuracy": [float(a / c) if c else None for a, c in zip(acc_sum, count, strict=True)],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of (bin share of images) x |accuracy - mean confidence|, top-class confidence."""
    return _ece(reliability_bins(probs, y_true, n_bins))


def _ece(bins: dict[str, list]) -> float:
    n = sum(bins["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"],
                                                           strict=True) if c)) if n else 0.0


def report_metrics(probs: np.ndarray, y_true: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The curve and calibration numbers of the report (the content of ``report_metrics.json``, minus
    the Grad-CAM note that :func:`write_report` adds)."""
    summary, _ = curve_metrics(probs, y_true, classes)
    bins = reliability_bins(probs, y_true)
    summary["ece"] = _ece(bins)
    summary["ece_bins"] = ECE_BINS
    summary["reliability"] = bins
    return summary


def _raw_escape(probs: np.ndarray, y_true: np.ndarray, classes: Sequence[str]) -> dict[str, Any] | None:
    """Escape and overkill of the plain argmax decision, when a class is called GOOD (no policy needed)."""
    from defectscope.decision.calibrate import default_good_class
    from defectscope.decision.calibration import cp_interval

    good = default_good_class(classes)
    if good is None:
        return None
    g = list(classes).index(good)
    pred = probs.argmax(axis=1)
    is_good = y_true == g
    out: dict[str, Any] = {"good_class": good}
    for key, mask, event in (("escape", ~is_good, pred == g), ("overkill", is_good, pred != g)):
        k, n = int((mask & event).sum()), int(mask.sum())
        out[key] = {"rate": k / n if n else None, "count": k, "of": n, "interval": list(cp_interval(k, n, 0.95)),
                    "confidence": 0.95}
    return out


# ---------------------------------------------------------------- html pieces

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


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _section(title: str, how: str, body: str) -> str:
    return f'<section><h2>{_esc(title)}</h2><p class="how">How to read this: {_esc(how)}</p>\n{body}</section>\n'


def _rate_row(name: str, r: dict[str, Any] | None, sentence: str) -> str:
    if not r or r.get("rate") is None:
        return ""
    lo, hi = r["interval"]
    conf = int(round(100 * r.get("confidence", 0.95)))
    value = f"{_pct(r['rate'])} <small>[{_pct(lo)}, {_pct(hi)}] at {conf}%</small>"
    return f"<tr><td>{_esc(name)}</td><td>{value}</td><td>{_esc(sentence)}</td></tr>"


def _headline(metrics: dict[str, Any], raw: dict[str, Any] | None) -> str:
    n = int(metrics.get("n") or sum(v["support"] for v in metrics["per_class"].values()))
    correct = int(round(metrics["accuracy"] * n))
    rows = [
        f"<tr><td>macro-F1</td><td>{_num(metrics['macro_f1'])}</td><td>The average F1 over classes: every class "
        f"counts the same, however few images it has. 1.0 is perfect.</td></tr>",
        f"<tr><td>worst class</td><td>{_esc(metrics['worst_class'])} (F1 {_num(metrics['worst_class_f1'])})</td>"
        f"<td>The class the model handles worst; look here first.</td></tr>",
        f"<tr><td>balanced accuracy</td><td>{_pct(metrics['balanced_accuracy'])}</td><td>On average, this share of "
        f"each class's images is put in the right class.</td></tr>",
        f"<tr><td>accuracy</td><td>{_pct(metrics['accuracy'])}</td><td>{correct} of {n} test images are put in the "
        f"right class. Misleading when one class dominates.</td></tr>",
    ]
    if raw is not None:
        good, how = raw["good_class"], "(most probable class, no policy)"
        for key in ("escape", "overkill"):
            r = raw[key]
            if key == "escape":
                sentence = f"{r['count']} of {r['of']} defective parts would have been passed as {good} {how}."
            else:
                sentence = f"{r['count']} of {r['of']} {good} parts would have been rejected as defective {how}."
            rows.append(_rate_row(f"{key} rate, raw model", r, sentence))
    pol = metrics.get("policy")
    if pol:
        esc, ovk = pol.get("escape"), pol.get("overkill")
        if esc:
            rows.append(_rate_row("escape rate, with policy", esc, f"{esc['count']} of {esc['of']} defective parts "
                                  "would have been passed as GOOD at the chosen operating point."))
        if ovk:
            rows.append(_rate_row("overkill rate, with policy", ovk, f"{ovk['count']} of {ovk['of']} good parts "
                                  "would have been rejected as defective at the chosen operating point."))
        n_pol = int(pol.get("n", 0))
        n_review = int(round(pol.get("review_rate", 0.0) * n_pol))
        rows.append(f"<tr><td>review rate</td><td>{_pct(pol.get('review_rate'))}</td><td>{n_review} of {n_pol} "
                    f"images would be sent to a person instead of being decided automatically.</td></tr>")
        if pol.get("drift_rate"):
            rows.append(f"<tr><td>drift rate</td><td>{_pct(pol['drift_rate'])}</td><td>Share of images flagged as "
                        f"unlike anything seen in training.</td></tr>")
        auto = pol.get("auto") or {}
        if auto:
            rows.append(f"<tr><td>accuracy of automatic decisions</td><td>{_pct(auto.get('accuracy'))}</td><td>Of the "
                        f"{pol.get('n_auto')} images the machine decides itself, this share is right.</td></tr>")
        if pol.get("pwa") is not None:
            rows.append(f"<tr><td>PWA / expected cost</td><td>{_num(pol['pwa'])} / "
                        f"{_num(pol.get('expected_cost_per_image'), 2)}</td><td>Penalty-weighted accuracy (1 is "
                        f"perfect) and the expected penalty per automatically decided image under the cost "
                        f"matrix.</td></tr>")
    return '<table class="headline big"><tr><th>figure</th><th>value</th><th>what it means</th></tr>' + \
        "".join(rows) + "</table>"


def _per_class_table(metrics: dict[str, Any]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    rows = []
    for name, m in metrics["per_class"].items():
        cls = ' class="worst"' if name == metrics.get("worst_class") else ""
        rows.append(f"<tr{cls}><td>{_esc(name)}</td><td>{_num(m['precision'])}</td><td>{_num(m['recall'])}</td>"
                    f"<td>{_num(m['f1'])}</td><td>{m['support']}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _auc_table(numbers: dict[str, Any]) -> str:
    head = "<tr><th>class</th><th>ROC AUC</th><th>average precision</th><th>PR AUC</th><th>note</th></tr>"
    rows = [f"<tr><td>{_esc(name)}</td><td>{_num(numbers['roc_auc'][name])}</td>"
            f"<td>{_num(numbers['average_precision'][name])}</td><td>{_num(numbers['pr_auc'][name])}</td>"
            f"<td>{_esc(numbers['curves_skipped'].get(name, ''))}</td></tr>" for name in numbers["roc_auc"]]
    rows.append(f"<tr><th>macro average</th><th>{_num(numbers['macro_roc_auc'])}</th>"
                f"<th>{_num(numbers['macro_average_precision'])}</th><th>{_num(numbers['macro_pr_auc'])}</th>"
                f"<th></th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


# ---------------------------------------------------------------- images


class _Thumbs:
    """Loads each image once, at the size the model saw; unreadable files give None (and one log line)."""

    def __init__(self, paths: Sequence[str], size: int, mode: str, log: Callable[..., Any]):
        self.paths, self.size, self.mode, self.log = paths, size, mode, log
        self.cache: dict[int, np.ndarray | None] = {}

    def __call__(self, i: int) -> np.ndarray | None:
        if i not in self.cache:
            from defectscope.data.images import load_gray

            try:
                self.cache[i] = load_gray(self.paths[i], self.size, self.mode)
            except Exception as exc:  # a moved or deleted file must not sink the whole report
                self.log(f"report: cannot show {self.paths[i]}: {exc}")
                self.cache[i] = None
        return self.cache[i]


def _gallery_indices(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(most confident mistakes, least confident correct predictions), up to GALLERY_SIZE each."""
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.nonzero(pred != y_true)[0]
    right = np.nonzero(pred == y_true)[0]
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:GALLERY_SIZE]
    right = right[np.argsort(conf[right], kind="stable")][:GALLERY_SIZE]
    return wrong, right


def _grid(indices: Sequence[int], thumbs: _Thumbs, captions: Sequence[str], path: Path, title: str,
          overlays: Sequence[np.ndarray | None] | None = None, ncols: int = 6) -> bytes | None:
    from defectscope.evaluation import plots

    keep = [j for j, i in enumerate(indices) if thumbs(int(i)) is not None]
    if not keep:
        return None
    fig = plots.image_grid([thumbs(int(indices[j])) for j in keep], [captions[j] for j in keep],
                           overlays=None if overlays is None else [overlays[j] for j in keep], ncols=ncols,
                           title=title)
    return plots.save(fig, path)


def _gradcam_section(
    model: Any, probs: np.ndarray, y_true: np.ndarray, classes: Sequence[str], thumbs: _Thumbs,
    mistakes: np.ndarray, per_class: int, plots_dir: Path, log: Callable[..., Any],
) -> tuple[str, dict[str, Any]]:
    """HTML and a summary dict; any failure of Grad-CAM becomes a note, never an exception."""
    from defectscope.evaluation.gradcam import gradcam_maps, target_layer

    info: dict[str, Any] = {"layer": None, "images": 0, "error": None}
    if model is None:
        return '<p class="note">No model was given, so no Grad-CAM heatmaps.</p>', info
    try:
        layer, layer_name = target_layer(model)
        info["layer"] = layer_name
        # Per class: the images the model is surest of, explaining that class. Mistakes: why it chose wrong.
        per = [i for k in range(len(classes)) for i in
               np.nonzero(y_true == k)[0][np.argsort(-probs[y_true == k, k], kind="stable")][:per_class]]
        body = [f"<p>Layer used: <code>{_esc(layer_name)}</code> (the last convolution of the backbone). Warm "
                f"colours mark the regions that pushed the model towards the named class.</p>"]
        for what, idx in (("classes", per), ("mistakes", list(mistakes))):
            idx = [int(i) for i in idx if thumbs(int(i)) is not None]
            if not idx:
                continue
            targets = [int(y_true[i]) for i in idx] if what == "classes" else [int(probs[i].argmax()) for i in idx]
            maps = gradcam_maps(model, np.stack([thumbs(i) for i in idx]), targets, layer=layer)
            info["images"] += len(idx)
            if what == "classes":
                captions = [f"{classes[t]} p={probs[i, t]:.2f}" for i, t in zip(idx, targets, strict=True)]
                title, ncols = "Grad-CAM towards the true class", max(per_class, 1) * max(1, 6 // max(per_class, 1))
            else:
                captions = [f"true {classes[y_true[i]]}\n-> {classes[t]} p={probs[i, t]:.2f}"
                            for i, t in zip(idx, targets, strict=True)]
                title, ncols = "Grad-CAM of the most confident mistakes, towards the predicted class", 6
            png = _grid(idx, thumbs, captions, plots_dir / f"gradcam_{what}.png", title, overlays=list(maps),
                        ncols=ncols)
            if png:
                body.append(f"<h3>{_esc(title)}</h3>{_img(png, title)}")
        return "\n".join(body), info
    except Exception as exc:  # a report without heatmaps beats no report
        info["error"] = f"{type(exc).__name__}: {exc}"
        log(f"report: Grad-CAM failed ({info['error']}); the report is written without heatmaps")
        return f'<p class="note">Grad-CAM could not be computed for this model: {_esc(info["error"])}</p>', info


# ---------------------------------------------------------------- drift

KIND_TEXT = {
    "corruptions": "test images with synthetic corruptions (blur, noise, contrast, ...), all pooled",
    "far": "images of something else entirely (wafer maps, digits)",
    "heldout_class": "a defect class the model never saw (model retrained without it, one class at a time)",
    "group": "parts of a group the model was not trained on (model retrained on one group only)",
    "extra": "your own folder of real Drift images",
}
DRIFT_HINT = ("Drift is not measured for this run: <code>defectscope drift-eval RUN</code> measures how well each "
              "score separates normal images from unlike ones, and <code>defectscope calibrate RUN</code> sets the "
              "Drift flag in the policy.")


def _one_in(rate: float) -> str:
    return f"about 1 in {max(1, round(1 / rate)):,}" if rate > 0 else "no"


def _drift_flag_html(drift: dict[str, Any], threshold: float | None, metrics: dict[str, Any]) -> str:
    from defectscope.decision.calibration import cp_interval
    from defectscope.decision.costs import DRIFT

    score, rate = drift.get("score"), drift.get("target_false_flag_rate")
    fit = drift.get("threshold_fit") or {}
    rows = [f"<tr><td>score</td><td>{_esc(score)}</td><td>How unlike the training images an image is; higher means "
            f"less alike.</td></tr>",
            f"<tr><td>threshold</td><td>{_num(threshold, 6) if threshold is not None else 'none'}</td><td>An image "
            f"whose {_esc(score)} score is above it is decided {DRIFT} (set aside), before any other rule.</td></tr>"]
    if rate is not None:
        how = ("chosen for the least expected cost; this is the fallback rate" if fit.get("method") == "cost"
               else "guaranteed on average for parts like the calibration images")
        rows.append(f"<tr><td>target false-flag rate</td><td>{100 * rate:g}%</td><td>{100 * rate:g}% false-flag "
                    f"rate: {_one_in(rate)} normal parts will be set aside as {DRIFT} ({_esc(how)}).</td></tr>")
    if drift.get("calibration_flag_rate") is not None:
        n_cal = int(drift.get("n_calibration") or 0)
        k_cal = int(round(drift["calibration_flag_rate"] * n_cal))
        rows.append(f"<tr><td>flagged on calibration images</td><td>{_pct(drift['calibration_flag_rate'])}</td>"
                    f"<td>{k_cal} of {n_cal} normal calibration images are above the threshold.</td></tr>")
    if fit.get("method") == "cost":
        rows.append(f"<tr><td>cost-aware threshold</td><td>{_pct(fit.get('drift_recall'))}</td><td>Share of the "
                    f"{fit.get('n_drift')} labelled Drift examples it catches; false flags on calibration images "
                    f"{_pct(fit.get('false_flag_rate'))}.</td></tr>")
    pol = metrics.get("policy") or {}
    n = int(pol.get("n") or 0)
    if n and "drift_rate" in pol:
        k = int((pol.get("decisions") or {}).get(DRIFT, round(pol["drift_rate"] * n)))
        lo, hi = cp_interval(k, n, 0.95)
        expect = f" (about {rate * n:.1f} expected at the target rate)" if rate is not None else ""
        rows.append(f"<tr><td>decided {DRIFT} here</td><td>{_pct(k / n)} <small>[{_pct(lo)}, {_pct(hi)}] at 95%"
                    f"</small></td><td>{k} of {n} evaluated images were set aside as {DRIFT}{expect}. Far more than "
                    f"the target means these images differ from the training images (new product, camera, "
                    f"lighting): look at them before trusting the other figures.</td></tr>")
    else:
        rows.append('<tr><td>evaluated images</td><td>n/a</td><td>These images were not decided with the policy, '
                    'so nothing is known about how many it flags.</td></tr>')
    return ('<h3>What the Drift flag does</h3><table class="headline"><tr><th>figure</th><th>value</th>'
            '<th>what it means</th></tr>' + "".join(rows) + "</table>")


def _drift_auroc_table(ev: dict[str, Any], policy_score: str | None) -> str:
    scores = list(ev.get("scores") or [])
    best = ev.get("best_score")
    kinds = ev.get("kinds") or {}

    def head(s: str) -> str:
        tags = [t for t, on in (("best", s == best), ("policy", s == policy_score)) if on]
        return f"<th>{_esc(s)}{'<br><small>' + ', '.join(tags) + '</small>' if tags else ''}</th>"

    def cell(s: str, text: str) -> str:
        return f"<td><b>{text}</b></td>" if s == best else f"<td>{text}</td>"

    rows = []
    for kind, res in kinds.items():
        label = f"{_esc(kind)} <small>({res.get('n_drift', '?')} images)</small>"
        cells = "".join(cell(s, f"{_num((res.get('auroc') or {}).get(s), 3)} / "
                                f"{_pct((res.get('fpr95') or {}).get(s))}") for s in scores)
        rows.append(f"<tr><td>{label}<br><small>{_esc(KIND_TEXT.get(kind, ''))}</small></td>{cells}</tr>")
    mean = ev.get("mean_auroc") or {}
    rows.append("<tr><th>mean AUROC</th>" + "".join(cell(s, _num(mean.get(s), 3)) for s in scores) + "</tr>")
    n_normal = next((r.get("n_normal") for r in kinds.values() if r.get("n_normal")), None)
    return (f"<h3>How well each score separates normal images from Drift (AUROC / FPR@95)</h3>"
            f"<p>Normal images: the run's test split{f' ({n_normal})' if n_normal else ''}. AUROC: the chance that a "
            f"Drift image scores higher than a normal one (1 is perfect, 0.5 is guessing). FPR@95: the share of "
            f"normal parts set aside if the threshold is placed to catch 95% of that kind (lower is better). The "
            f"best score (highest mean AUROC) is in bold.</p><table><tr><th>Drift kind</th>"
            + "".join(head(s) for s in scores) + "</tr>" + "".join(rows) + "</table>")


def _drift_section(run: Path | None, metrics: dict[str, Any], policy: Any, plots_dir: Path,
                   log: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """HTML of the Drift section and its numbers; a damaged drift_eval file becomes a note."""
    from defectscope.decision.drift_fit import DRIFT_EVAL, DRIFT_EVAL_SCORES, load_scores
    from defectscope.evaluation import plots

    drift = getattr(policy, "drift", None) or None
    threshold = getattr(policy, "drift_threshold", None) if drift else None
    policy_score = drift.get("score") if drift else None
    ev_path = Path(run) / DRIFT_EVAL if run is not None else None
    npz_path = Path(run) / DRIFT_EVAL_SCORES if run is not None else None
    ev = raw = None
    notes: list[str] = []
    unreadable = False
    info: dict[str, Any] = {"drift_eval": False, "histograms": [], "threshold_flags": {}}
    try:
        if ev_path is not None and ev_path.is_file():
            ev = json.loads(ev_path.read_text())
        if npz_path is not None and npz_path.is_file():
            raw = load_scores(npz_path)
    except Exception as exc:  # a damaged or foreign file must not sink the report
        log(f"report: cannot read the drift evaluation ({exc})")
        unreadable = True
        notes.append(f"The drift evaluation files could not be read ({_esc(exc)}); run "
                     f"<code>defectscope drift-eval RUN</code> again.")
    if ev is None and raw is None and not drift and not unreadable:
        return f'<p class="note">{DRIFT_HINT}</p>', info
    body: list[str] = []
    if drift:
        body.append(_drift_flag_html(drift, threshold, metrics))
    else:
        notes.append("The policy has no Drift flag, so no image is set aside as Drift: "
                     "<code>defectscope calibrate RUN</code> sets it.")
    if ev is not None:
        info["drift_eval"] = True
        body.append(_drift_auroc_table(ev, policy_score))
    elif not unreadable:
        notes.append("The scores were not measured on Drift images: <code>defectscope drift-eval RUN</code> "
                     "does it (AUROC table and histograms).")
    if raw is not None:
        available = set(raw["normal"] or {}) | {s for e in raw["kinds"].values() for s in e["drift"]}
        score = next((s for s in (policy_score, (ev or {}).get("best_score"), "mahalanobis") if s in available),
                     None) or (sorted(available)[0] if available else None)
        order = [k for k in (ev or {}).get("kinds") or {} if k in raw["kinds"]]
        order += [k for k in raw["kinds"] if k not in order]
        figs, flags = [], []
        for kind in order:
            entry = raw["kinds"].get(kind)
            if score is None or entry is None or score not in entry["drift"]:
                continue
            own = entry["normal"] is None  # scored by the run's own model: the policy's threshold applies
            normal = (raw["normal"] or {}).get(score) if own else entry["normal"].get(score)
            if normal is None:
                continue
            line = threshold if (own and threshold is not None and score == policy_score) else None
            label = f"policy threshold {line:.4g}" if line is not None else ""
            fig = plots.drift_histogram(normal, entry["drift"][score], score=score, kind=kind, threshold=line,
                                        threshold_label=label)
            png = plots.save(fig, plots_dir / f"drift_{kind}.png")
            info["histograms"].append(kind)
            caption = "" if own else ("<p><small>Scored by the models retrained for this test, so the policy's "
                                      "threshold does not apply.</small></p>")
            figs.append(f"<h4>normal vs {_esc(kind)}</h4>{caption}{_img(png, f'drift histogram {kind}')}")
            if line is not None:
                share = float(np.mean(entry["drift"][score] > line)) if len(entry["drift"][score]) else None
                info["threshold_flags"][kind] = share
                flags.append(f"<tr><td>{_esc(kind)}</td><td>{_pct(share)}</td></tr>")
        normal_policy = (raw["normal"] or {}).get(policy_score) if threshold is not None else None
        if normal_policy is not None:
            share = float(np.mean(normal_policy > threshold)) if len(normal_policy) else None
            info["threshold_flags"]["normal"] = share
            flags.insert(0, f"<tr><td>normal (test split)</td><td>{_pct(share)}</td></tr>")
        if figs:
            if score == policy_score:
                what = f"the policy's score ({_esc(score)}), with its threshold dashed where it applies"
            elif ev is not None and score == ev.get("best_score"):
                what = f"the best score of the drift evaluation ({_esc(score)})"
            else:
                what = f"the {_esc(score)} score"
            body.append(f"<h3>Score histograms: normal vs each Drift kind</h3><p>Each plot shows {what}. Bars "
                        f"are shares of each set, so sets of different size compare. Little overlap means the "
                        f"score tells the two apart.</p>" + "".join(figs))
        if flags:
            body.append("<h3>What the policy's threshold flags on the drift evaluation images</h3><p>The test "
                        "split includes the calibration images, so its normal rate is not an independent "
                        "check.</p><table><tr><th>images</th><th>flagged as Drift</th></tr>" + "".join(flags)
                        + "</table>")
    body.extend(f'<p class="note">{n}</p>' for n in notes)
    return "\n".join(body), info


# ---------------------------------------------------------------- the page


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
    log: Callable[..., Any] = print,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained), ``out_dir/plots/*.png`` and ``out_dir/report_metrics.json``.

    ``metrics``: what ``classification_metrics`` returns (optionally with ``policy`` from
    ``apply_policy_metrics``); ``probs``: uncalibrated softmax probabilities (N, K) in ``classes`` order,
    rows matching ``y_true`` (class indices) and ``paths``; ``run``: the run directory, read only for
    ``history.csv`` (None: no training curves); ``model``/``spec`` from ``rundir.load_model`` enable
    Grad-CAM and set the thumbnail size; ``policy``: a :class:`~defectscope.decision.policy.Policy`
    whose temperature and review band place the operating point on the review trade-off curve.
    Returns the path of the HTML file.
    """
    from defectscope.decision.calibration import review_curve
    from defectscope.decision.policy import calibrated_probs, review_scores
    from defectscope.evaluation import plots

    out_dir = Path(out_dir)
    plots_dir = out_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    classes = list(classes)
    numbers = report_metrics(probs, y_true, classes)
    _, curves = curve_metrics(probs, y_true, classes)
    sections: list[str] = []

    sections.append(_section(
        "1. Headline", "macro-F1 and the worst class say more than accuracy when one class dominates; escape "
        "(defective passed as good) is the costly error, overkill (good rejected) the cheaper one. Brackets are "
        "confidence intervals: with few test images the true rate can lie anywhere inside them.",
        _headline(metrics, _raw_escape(probs, y_true, classes))))

    sections.append(_section(
        "2. Per-class results", "precision: of the images called this class, the share that really are; recall: "
        "of the images of this class, the share found; support: test images of the class. The worst class is "
        "shaded.", _per_class_table(metrics)))

    cm = np.asarray(metrics["confusion_matrix"])
    cm_body = []
    for normalized, name in ((False, "confusion_counts"), (True, "confusion_normalized")):
        data = np.asarray(metrics["confusion_matrix_normalized"]) if normalized else cm
        png = plots.save(plots.confusion_matrix(data, classes, normalized=normalized), plots_dir / f"{name}.png")
        cm_body.append(_img(png, name))
    sections.append(_section(
        "3. Confusion matrix", "each row is a true class, each column what the model said. The diagonal is right; "
        "everything else is a mix-up. In the row-normalised matrix a row sums to 1, so a row's off-diagonal "
        "cells are that class's error rates.", "\n".join(cm_body)))

    roc_png = plots.save(plots.roc_curves(curves["roc"]), plots_dir / "roc.png")
    pr_png = plots.save(plots.pr_curves(curves["pr"]), plots_dir / "pr.png")
    sections.append(_section(
        "4. ROC and precision-recall curves (one class against the rest)", "each curve shows what a threshold on "
        "that class's probability trades off. ROC AUC 1.0 separates the class perfectly, 0.5 is guessing. "
        "Average precision is the more honest figure for rare classes: it drops when many false alarms come "
        "with each hit.", _img(roc_png, "ROC curves") + _img(pr_png, "precision-recall curves") + _auc_table(numbers)))

    rel_png = plots.save(plots.reliability(numbers["reliability"], numbers["ece"]), plots_dir / "reliability.png")
    sections.append(_section(
        "5. Calibration", f"images are grouped by the model's confidence in its answer ({ECE_BINS} bins); in a "
        "well-calibrated model, answers given with 90% confidence are right 90% of the time (bars on the "
        "diagonal). The expected calibration error (ECE) is the average gap, weighted by images per bin. "
        "Thresholds on confidence (review band, escape cap) rely on this.",
        f"<p>ECE: <b>{_num(numbers['ece'])}</b></p>" + _img(rel_png, "reliability diagram")))

    history_path = Path(run) / "history.csv" if run is not None else None
    if history_path is not None and history_path.is_file():
        import pandas as pd

        history = pd.read_csv(history_path)
        png = plots.save(plots.training_curves(history), plots_dir / "training.png")
        body = _img(png, "training curves")
    else:
        body = '<p class="note">No history.csv in the run directory, so no training curves.</p>'
    sections.append(_section(
        "6. Training curves", "validation loss rising while training loss falls means the model starts to "
        "memorise the training images; the dashed line marks the epoch whose weights were kept.", body))

    size = int(spec["image_size"]) if spec else THUMB_SIZE
    thumbs = _Thumbs(paths, size, (spec or {}).get("resize", "squash"), log)
    mistakes, unsure = _gallery_indices(probs, y_true)
    gallery = []
    for what, idx, title in (("mistakes", mistakes, "most confident mistakes"),
                             ("unsure_correct", unsure, "least confident correct predictions")):
        captions = [f"true {classes[y_true[i]]}\npred {classes[probs[i].argmax()]} p={probs[i].max():.2f}"
                    for i in idx]
        png = _grid(list(idx), thumbs, captions, plots_dir / f"gallery_{what}.png", title) if len(idx) else None
        gallery.append(f"<h3>{_esc(title)} ({len(idx)})</h3>" + (_img(png, title) if png else "<p>none</p>"))
    sections.append(_section(
        "7. Gallery", "confident mistakes are often wrong labels or a defect type the model has not learned; "
        "correct but unsure images are the borderline cases a person should review.", "\n".join(gallery)))

    cam_html, cam_info = _gradcam_section(model, probs, y_true, classes, thumbs, mistakes, gradcam_per_class,
                                          plots_dir, log)
    sections.append(_section(
        "8. Grad-CAM: where the model looked", "a heatmap on a defect means the model decided for the right "
        "reason; a heatmap on the background or image border means it may rely on something that will not hold "
        "on the line.", cam_html))

    temperature = float(getattr(policy, "temperature", 1.0) or 1.0)
    kind = getattr(policy, "review_score", "top") or "top"
    cal = calibrated_probs(probs, temperature, "probs")
    scores = review_scores(cal, kind)
    correct = cal.argmax(axis=1) == y_true
    body = ""
    if len(y_true):
        curve = review_curve(scores, correct)
        threshold = getattr(policy, "review_threshold", None)
        if threshold is not None:
            auto = scores >= threshold
            point = (float(1 - auto.mean()), float(correct[auto].mean()) if auto.any() else float("nan"))
            label = f"policy: review {kind} score < {threshold:.4f}"
        else:
            point, label = (0.0, float(correct.mean())), "no review band: everything decided automatically"
        png = plots.save(plots.review_tradeoff(curve, point, label), plots_dir / "review_tradeoff.png")
        note = (f"Probabilities calibrated with the policy's temperature {temperature:.3f}. " if policy is not None
                else "No decision policy: raw probabilities. ")
        body = (f"<p>{_esc(note)}Operating point: review rate {_pct(point[0])}, accuracy of automatic decisions "
                f"{_pct(point[1])} (most probable class; the escape rule of a policy is not applied here).</p>"
                + _img(png, "review trade-off"))
    sections.append(_section(
        "9. Review band trade-off", "sending the least confident images to a person raises the accuracy of what "
        "the machine decides alone; read off how much review buys how much accuracy.", body or "<p>no images</p>"))

    drift_html, drift_info = _drift_section(run, metrics, policy, plots_dir, log)
    sections.append(_section(
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
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{_esc(title)}</h1>\n"
            f"<p>{_esc(intro)}</p>\n" + "".join(sections) + "</body></html>\n")
    html_path = out_dir / REPORT_FILE
    html_path.write_text(page, encoding="utf-8")
    (out_dir / REPORT_METRICS_FILE).write_text(json.dumps(numbers, indent=2))
    log(f"report written: {html_path}")
    return html_path


def report_from_run(run: str | Path, out_dir: str | Path | None = None, *, gradcam_per_class: int = 3,
                    log: Callable[..., Any] = print) -> Path:
    """Rebuild the report from a run's ``evaluation/`` files (after ``evaluate``), loading model and policy.

    Probabilities come from ``logits.npy`` (exact) when present, else the rounded ``p_<class>`` columns
    of ``predictions.csv``.
    """
    import pandas as pd

    from defectscope import rundir
    from defectscope.decision.policy import POLICY_FILE, Policy, softmax

    run = Path(run)
    ev = run / rundir.EVALUATION
    metrics = json.loads((ev / "metrics.json").read_text())
    pred = pd.read_csv(ev / "predictions.csv", dtype={"label": str, "predicted": str}, keep_default_na=False)
    model, spec = rundir.load_model(run)
    classes = list(spec["classes"])
    if (ev / "logits.npy").is_file():
        probs = softmax(np.load(ev / "logits.npy"))
    else:
        probs = pred[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    index = {c: i for i, c in enumerate(classes)}
    y_true = pred["label"].map(index).to_numpy()
    policy = Policy.from_json(run / POLICY_FILE) if (run / POLICY_FILE).is_file() else None
    return write_report(run, metrics=metrics, probs=probs, y_true=y_true, paths=list(pred["path"]),
                        classes=classes, out_dir=Path(out_dir) if out_dir else ev, model=model, spec=spec,
                        policy=policy, gradcam_per_class=gradcam_per_class, log=log)
