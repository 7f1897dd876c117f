"""The report's Drift section: the policy's flag in words, AUROC per Drift kind, score histograms."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.decision.costs import DRIFT
from defectscope.decision.drift.support import per_day_words
from defectscope.decision.policy import relative_drift
from defectscope.decision.thresholds import cp_interval
from defectscope.evaluation.drift_eval import load_scores
from defectscope.evaluation.report.html import esc, img, num, pct
from defectscope.rundir import DRIFT_EVAL, DRIFT_EVAL_SCORES

log = logging.getLogger(__name__)


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


# The one place the Drift score's scale is explained; every other figure and plot of the section refers to it.
DRIFT_SCALE = ("<code>drift_score</code> is the image's Drift score relative to the policy's line (the score "
               "divided by the line the calibration images set): 1.0 is the line, 2.0 twice as far from normal, "
               "below 1.0 not flagged. It is the figure predict, the sorter, the dashboard and evaluate's "
               "predictions.csv show, and the scale of this section's histograms; the raw line stays in policy.json "
               "(<code>drift_threshold</code>) for the model file.")
# A histogram scored by retrained models has no policy line: its 1.0 is the line flagging this share of its own
# normal images (the policy's target rate when there is one), so its scale reads like the policy's.
DEFAULT_LINE_RATE = 0.01


def _one_in(rate: float) -> str:
    return f"about 1 in {max(1, round(1 / rate)):,}" if rate > 0 else "no"


def _score_text(drift: dict[str, Any]) -> str:
    members = drift.get("members") or [drift.get("score")]
    what = {"patch": "the most unusual patch of the image, against the same patch position on the training "
                     "images (catches local defects and smudges)",
            "photometric": "how unlike the training images the image's brightness, contrast and sharpness are "
                           "(catches exposure and contrast faults that still look like a part)",
            "mahalanobis": "the distance of the whole image's features from the training classes",
            "knn": "the distance of the whole image's features to the nearest training images",
            "vim": "the image's features outside the directions the training images use, minus the "
                   "classifier's confidence"}
    if len(members) > 1:
        parts = "; ".join(f"{esc(m)}: {esc(what.get(m, m))}" for m in members)
        return (f"The largest of {len(members)} scores, each standardised on the validation images so they "
                f"compare ({parts}). Higher means less like the training images.")
    return f"{esc(what.get(members[0], 'How unlike the training images an image is'))}; higher means less alike."


def _line_rate_row(drift: dict[str, Any], rate: float | None) -> str:
    """The false-flag rate a quality engineer reads, and what the calibration images can guarantee."""
    support = drift.get("rate_support") or {}
    achieved = support.get("guaranteed_rate", rate)
    if achieved is None:
        return ""
    text = f"{per_day_words(achieved)} (a line making 10,000 normal parts a day)."
    if support and not support.get("supported", True):
        text += (f" Only {support['n_calibration']} normal calibration images: they guarantee "
                 f"{100 * achieved:.2g}% at best, not the {100 * support['requested_rate']:g}% asked for, which "
                 f"needs at least {support['images_needed']} normal images.")
    return f"<tr><td>false flags on the line</td><td>{100 * achieved:.2g}%</td><td>{esc(text)}</td></tr>"


def _drift_flag_html(drift: dict[str, Any], threshold: float | None, metrics: dict[str, Any]) -> str:
    score, rate = drift.get("score"), drift.get("target_false_flag_rate")
    fit = drift.get("threshold_fit") or {}
    rows = [f"<tr><td>score</td><td>{esc(score)}</td><td>{_score_text(drift)}</td></tr>",
            f"<tr><td>threshold</td><td>{'drift_score 1.00' if threshold is not None else 'none'}</td><td>An "
            f"image whose <code>drift_score</code> is above 1.00 is decided {DRIFT} (set aside), before any other "
            f"rule. {DRIFT_SCALE}</td></tr>"]
    if rate is not None:
        how = ("chosen for the least expected cost; this is the fallback rate" if fit.get("method") == "cost"
               else "guaranteed on average for parts like the calibration images")
        rows.append(f"<tr><td>target false-flag rate</td><td>{100 * rate:g}%</td><td>{100 * rate:g}% false-flag "
                    f"rate: {_one_in(rate)} normal parts will be set aside as {DRIFT} ({esc(how)}).</td></tr>")
    rows.append(_line_rate_row(drift, rate))
    if drift.get("calibration_flag_rate") is not None:
        n_cal = int(drift.get("n_calibration") or 0)
        k_cal = int(round(drift["calibration_flag_rate"] * n_cal))
        rows.append(f"<tr><td>flagged on calibration images</td><td>{pct(drift['calibration_flag_rate'])}</td>"
                    f"<td>{k_cal} of {n_cal} normal calibration images are above the threshold.</td></tr>")
    if fit.get("method") == "cost":
        rows.append(f"<tr><td>cost-aware threshold</td><td>{pct(fit.get('drift_recall'))}</td><td>Share of the "
                    f"{fit.get('n_drift')} labelled Drift examples it catches; false flags on calibration images "
                    f"{pct(fit.get('false_flag_rate'))}.</td></tr>")
    pol = metrics.get("policy") or {}
    n = int(pol.get("n") or 0)
    if n and "drift_rate" in pol:
        k = int((pol.get("decisions") or {}).get(DRIFT, round(pol["drift_rate"] * n)))
        lo, hi = cp_interval(k, n, 0.95)
        expect = f" (about {rate * n:.1f} expected at the target rate)" if rate is not None else ""
        rows.append(f"<tr><td>decided {DRIFT} here</td><td>{pct(k / n)} <small>[{pct(lo)}, {pct(hi)}] at 95%"
                    f"</small></td><td>{k} of {n} evaluated images were set aside as {DRIFT}{expect}. Far more than "
                    f"the target means these images differ from the training images (new product, camera, "
                    f"lighting): look at them before trusting the other figures.</td></tr>")
    else:
        rows.append('<tr><td>evaluated images</td><td>n/a</td><td>These images were not decided with the policy, '
                    'so nothing is known about how many it flags.</td></tr>')
    return ('<h3>What the Drift flag does</h3><table class="headline"><tr><th>figure</th><th>value</th>'
            '<th>what it means</th></tr>' + "".join(rows) + "</table>")


def _chosen_html(ev: dict[str, Any], policy_score: str | None) -> str:
    """The chosen score's AUROC and FPR@95 per kind, and how the choice holds on a kind it was not made on."""
    chosen = ev.get("chosen") or {}
    per_kind = chosen.get("per_kind") or {}
    if not per_kind:
        return ""
    rows = "".join(f"<tr><td>{esc(k)}<br><small>{esc(KIND_TEXT.get(k, ''))}</small></td><td>{num(v.get('auroc'), 3)}"
                   f"</td><td>{pct(v.get('fpr95'))}</td></tr>" for k, v in per_kind.items())
    sel = ev.get("selection") or {}
    loko = sel.get("loko") or {}
    if loko:
        held = "; ".join(f"without {esc(k)}: {esc(v['chosen'])}, AUROC {num(v['auroc'], 3)} on {esc(k)}"
                         for k, v in loko.items())
        honest = (f"<p>Chosen for the best <em>worst</em>-kind AUROC ({num(sel.get('worst_in_sample'), 3)}). That "
                  f"choice saw every kind; to know how it does on a kind of Drift nobody measured, each kind was "
                  f"left out in turn and the score chosen on the others alone: {held}. The lowest, "
                  f"<b>{num(sel.get('loko_worst'), 3)}</b>, is the honest expectation.</p>")
    else:
        honest = f"<p>{esc(sel.get('note', ''))}</p>" if sel.get("note") else ""
    used = "" if policy_score in (None, chosen.get("score")) else (
        f" The policy uses {esc(policy_score)}, not this score: <code>defectscope calibrate RUN</code> adopts it.")
    return (f"<h3>The chosen Drift score: {esc(chosen.get('score'))}</h3><p>How often it ranks a Drift image above "
            f"a normal one (AUROC) and the share of normal parts set aside to catch 95% of each kind (FPR@95).{used}"
            f"</p><table><tr><th>Drift kind</th><th>AUROC</th><th>FPR@95</th></tr>{rows}</table>{honest}")


def _drift_auroc_table(ev: dict[str, Any], policy_score: str | None) -> str:
    best = ev.get("best_score")
    # The member scores and the chosen one; every fused candidate stays in drift_eval.json.
    scores = list(ev.get("members") or ev.get("scores") or [])
    scores += [s for s in (best, policy_score) if s and s not in scores and s in (ev.get("scores") or [])]
    kinds = ev.get("kinds") or {}

    def head(s: str) -> str:
        tags = [t for t, on in (("best", s == best), ("policy", s == policy_score)) if on]
        return f"<th>{esc(s)}{'<br><small>' + ', '.join(tags) + '</small>' if tags else ''}</th>"

    def cell(s: str, text: str) -> str:
        return f"<td><b>{text}</b></td>" if s == best else f"<td>{text}</td>"

    rows = []
    for kind, res in kinds.items():
        label = f"{esc(kind)} <small>({res.get('n_drift', '?')} images)</small>"
        cells = "".join(cell(s, f"{num((res.get('auroc') or {}).get(s), 3)} / "
                                f"{pct((res.get('fpr95') or {}).get(s))}") for s in scores)
        rows.append(f"<tr><td>{label}<br><small>{esc(KIND_TEXT.get(kind, ''))}</small></td>{cells}</tr>")
    mean = ev.get("mean_auroc") or {}
    rows.append("<tr><th>mean AUROC</th>" + "".join(cell(s, num(mean.get(s), 3)) for s in scores) + "</tr>")
    n_normal = next((r.get("n_normal") for r in kinds.values() if r.get("n_normal")), None)
    return (f"<h3>How well each score separates normal images from Drift (AUROC / FPR@95)</h3>"
            f"<p>Normal images: the run's test split{f' ({n_normal})' if n_normal else ''}. AUROC: the chance that a "
            f"Drift image scores higher than a normal one (1 is perfect, 0.5 is guessing). FPR@95: the share of "
            f"normal parts set aside if the threshold is placed to catch 95% of that kind (lower is better). The "
            f"chosen score (best worst-kind AUROC) is in bold.</p><table><tr><th>Drift kind</th>"
            + "".join(head(s) for s in scores) + "</tr>" + "".join(rows) + "</table>")


def drift_section(run: Path | None, metrics: dict[str, Any], policy: Any,
                  plots_dir: Path) -> tuple[str, dict[str, Any]]:
    """HTML of the Drift section and its numbers; a damaged drift_eval file becomes a note."""
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
        log.warning(f"report: cannot read the drift evaluation ({exc})")
        unreadable = True
        notes.append(f"The drift evaluation files could not be read ({esc(exc)}); run "
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
        body.append(_chosen_html(ev, policy_score))
        body.append(_drift_auroc_table(ev, policy_score))
    elif not unreadable:
        notes.append("The scores were not measured on Drift images: <code>defectscope drift-eval RUN</code> "
                     "does it (AUROC table and histograms).")
    if raw is not None:
        rate = drift.get("target_false_flag_rate") if drift else None
        body.extend(_histograms_html(raw, ev, policy_score, threshold, rate, plots_dir, info))
    body.extend(f'<p class="note">{n}</p>' for n in notes)
    return "\n".join(body), info


def _histograms_html(raw: dict[str, Any], ev: dict[str, Any] | None, policy_score: str | None,
                     threshold: float | None, rate: float | None, plots_dir: Path, info: dict[str, Any]) -> list[str]:
    """The score histograms per Drift kind on the drift_score scale, and what the policy's line flags."""
    from defectscope.evaluation import plots

    available = set(raw["normal"] or {}) | {s for e in raw["kinds"].values() for s in e["drift"]}
    score = next((s for s in (policy_score, (ev or {}).get("best_score"), "mahalanobis") if s in available),
                 None) or (sorted(available)[0] if available else None)
    order = [k for k in (ev or {}).get("kinds") or {} if k in raw["kinds"]]
    order += [k for k in raw["kinds"] if k not in order]
    line_rate = rate or DEFAULT_LINE_RATE
    body, figs, flags = [], [], []
    for kind in order:
        entry = raw["kinds"].get(kind)
        if score is None or entry is None or score not in entry["drift"]:
            continue
        own = entry["normal"] is None  # scored by the run's own model: the policy's threshold applies
        normal = (raw["normal"] or {}).get(score) if own else entry["normal"].get(score)
        if normal is None:
            continue
        line = threshold if (own and threshold is not None and score == policy_score) else None
        # Without the policy's line, the line flagging line_rate of these normal images gives the scale its 1.0.
        scale = line if line is not None else _own_line(normal, line_rate)
        fig = plots.drift_histogram(relative_drift(normal, scale), relative_drift(entry["drift"][score], scale),
                                    score=score, kind=kind, threshold=1.0 if line is not None else None,
                                    threshold_label="the policy's line (drift_score 1.00)", relative=True)
        png = plots.save(fig, plots_dir / f"drift_{kind}.png")
        info["histograms"].append(kind)
        why = ("Scored by the models retrained for this test, so the policy's threshold does not apply"
               if not own else "The policy has no line on this score")
        caption = "" if line is not None else (f"<p><small>{why}: 1.0 here is the line flagging "
                                                f"{100 * line_rate:g}% of these normal images.</small></p>")
        figs.append(f"<h4>normal vs {esc(kind)}</h4>{caption}{img(png, f'drift histogram {kind}')}")
        if line is not None:
            share = float(np.mean(entry["drift"][score] > line)) if len(entry["drift"][score]) else None
            info["threshold_flags"][kind] = share
            flags.append(f"<tr><td>{esc(kind)}</td><td>{pct(share)}</td></tr>")
    normal_policy = (raw["normal"] or {}).get(policy_score) if threshold is not None else None
    if normal_policy is not None:
        share = float(np.mean(normal_policy > threshold)) if len(normal_policy) else None
        info["threshold_flags"]["normal"] = share
        flags.insert(0, f"<tr><td>normal (test split)</td><td>{pct(share)}</td></tr>")
    if figs:
        if score == policy_score:
            what = f"the policy's score ({esc(score)}) as <code>drift_score</code>, its line dashed where it applies"
        elif ev is not None and score == ev.get("best_score"):
            what = f"the best score of the drift evaluation ({esc(score)})"
        else:
            what = f"the {esc(score)} score"
        body.append(f"<h3>Score histograms: normal vs each Drift kind</h3><p>Each plot shows {what}. Bars "
                    f"are shares of each set, so sets of different size compare. Little overlap means the "
                    f"score tells the two apart.</p>" + "".join(figs))
    if flags:
        body.append("<h3>What the policy's threshold flags on the drift evaluation images</h3><p>The test "
                    "split includes the calibration images, so its normal rate is not an independent "
                    "check.</p><table><tr><th>images</th><th>flagged as Drift</th></tr>" + "".join(flags)
                    + "</table>")
    return body


def _own_line(normal: np.ndarray, rate: float) -> float:
    """The score above which ``rate`` of these normal images lie (1.0 of their relative scale)."""
    finite = np.asarray(normal, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.quantile(finite, 1 - rate)) if finite.size else 1.0
