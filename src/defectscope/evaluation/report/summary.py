"""The report's headline and per-class tables."""

from __future__ import annotations

from typing import Any

from defectscope.decision.thresholds import cp_interval
from defectscope.evaluation.report.html import esc, num, pct
from defectscope.evaluation.report.html import rate_row as _rate_row

DEFAULT_LEVEL = 0.95


def headline_level(metrics: dict[str, Any]) -> float:
    """The one interval level of the headline: the policy's confidence (its rates carry it), else 95%."""
    pol = metrics.get("policy") or {}
    levels = {r["confidence"] for r in pol.values() if isinstance(r, dict) and "confidence" in r}
    return float(next(iter(levels))) if len(levels) == 1 else DEFAULT_LEVEL


def _at_level(r: dict[str, Any] | None, level: float) -> dict[str, Any] | None:
    """``r`` with its Clopper-Pearson interval at ``level`` (recomputed from its counts when it differs)."""
    if not r or r.get("rate") is None or r.get("confidence") == level:
        return r
    return {**r, "interval": list(cp_interval(int(r["count"]), int(r["of"]), level)), "confidence": level}


def headline(metrics: dict[str, Any], raw: dict[str, Any] | None) -> str:
    level = headline_level(metrics)

    def rate_row(name: str, r: dict[str, Any] | None, sentence: str) -> str:
        return _rate_row(name, _at_level(r, level), sentence, level=False)

    n = int(metrics.get("n") or sum(v["support"] for v in metrics["per_class"].values()))
    correct = int(round(metrics["accuracy"] * n))
    rows = [
        f"<tr><td>macro-F1</td><td>{num(metrics['macro_f1'])}</td><td>The average F1 over classes: every class "
        f"counts the same, however few images it has. 1.0 is perfect.</td></tr>",
        f"<tr><td>worst class</td><td>{esc(metrics['worst_class'])} (F1 {num(metrics['worst_class_f1'])})</td>"
        f"<td>The class the model handles worst; look here first.</td></tr>",
        f"<tr><td>balanced accuracy</td><td>{pct(metrics['balanced_accuracy'])}</td><td>On average, this share of "
        f"each class's images is put in the right class.</td></tr>",
        f"<tr><td>accuracy</td><td>{pct(metrics['accuracy'])}</td><td>{correct} of {n} test images are put in the "
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
            rows.append(rate_row(f"{key} rate, raw model", r, sentence))
    pol = metrics.get("policy")
    if pol:
        escape, overkill = pol.get("escape"), pol.get("overkill")
        automation = pol.get("automation")
        if automation:
            rows.insert(0, rate_row("automation rate, with policy", automation,
                                    f"{automation['count']} of {automation['of']} images are decided without a "
                                    f"person (passed or rejected); the other {automation['of'] - automation['count']} "
                                    f"go to review or are flagged as Drift."))
        if escape:
            rows.append(rate_row("escape rate, with policy", escape, f"{escape['count']} of {escape['of']} defective "
                                 "parts would have been passed as GOOD at the chosen operating point (capped "
                                 "classes)."))
        nuisance = pol.get("nuisance_escape")
        if nuisance:
            rows.append(rate_row("nuisance escape rate, with policy", nuisance, f"{nuisance['count']} of "
                                 f"{nuisance['of']} parts of the nuisance classes were passed (reported, not capped)."))
        if overkill:
            rows.append(rate_row("overkill rate, with policy", overkill, f"{overkill['count']} of {overkill['of']} "
                                 "good parts were rejected automatically by the policy (good parts sent to review "
                                 "are not counted: a person passes them)."))
        n_pol = int(pol.get("n", 0))
        n_review = int(round(pol.get("review_rate", 0.0) * n_pol))
        rows.append(f"<tr><td>review rate</td><td>{pct(pol.get('review_rate'))}</td><td>{n_review} of {n_pol} "
                    f"images would be sent to a person instead of being decided automatically.</td></tr>")
        if pol.get("drift_rate"):
            rows.append(f"<tr><td>drift rate</td><td>{pct(pol['drift_rate'])}</td><td>Share of images flagged as "
                        f"unlike anything seen in training.</td></tr>")
        auto = pol.get("auto") or {}
        if auto:
            rows.append(f"<tr><td>class accuracy of automatic decisions</td><td>{pct(auto.get('accuracy'))}</td><td>Of "
                        f"the {pol.get('n_auto')} images the policy decides itself, this share gets the right class "
                        f"(a defect rejected under the wrong defect class counts as wrong).</td></tr>")
        if pol.get("pwa") is not None:
            rows.append(f"<tr><td>PWA / expected cost</td><td>{num(pol['pwa'])} / "
                        f"{num(pol.get('expected_cost_per_image'), 2)}</td><td>Penalty-weighted accuracy (1 is "
                        f"perfect) and the expected penalty per automatically decided image under the cost "
                        f"matrix.</td></tr>")
    caption = (f"<caption>[brackets]: {level:.0%} confidence intervals (Clopper-Pearson), the same level for "
               f"every rate here</caption>" if any("<small>[" in r for r in rows) else "")
    return f'<table class="headline big">{caption}<tr><th>figure</th><th>value</th><th>what it means</th></tr>' + \
        "".join(rows) + "</table>"


def per_class_table(metrics: dict[str, Any]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    rows = []
    for name, m in metrics["per_class"].items():
        cls = ' class="worst"' if name == metrics.get("worst_class") else ""
        rows.append(f"<tr{cls}><td>{esc(name)}</td><td>{num(m['precision'])}</td><td>{num(m['recall'])}</td>"
                    f"<td>{num(m['f1'])}</td><td>{m['support']}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def auc_table(numbers: dict[str, Any]) -> str:
    head = "<tr><th>class</th><th>ROC AUC</th><th>average precision</th><th>PR AUC</th><th>note</th></tr>"
    rows = [f"<tr><td>{esc(name)}</td><td>{num(numbers['roc_auc'][name])}</td>"
            f"<td>{num(numbers['average_precision'][name])}</td><td>{num(numbers['pr_auc'][name])}</td>"
            f"<td>{esc(numbers['curves_skipped'].get(name, ''))}</td></tr>" for name in numbers["roc_auc"]]
    rows.append(f"<tr><th>macro average</th><th>{num(numbers['macro_roc_auc'])}</th>"
                f"<th>{num(numbers['macro_average_precision'])}</th><th>{num(numbers['macro_pr_auc'])}</th>"
                f"<th></th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def purity_table(policy: Any, metrics: dict[str, Any]) -> str:
    """The REJECT purity of each gated class: its target, the certified threshold, the purity on the calibration
    images and on these test images, with intervals (empty without a purity in the policy)."""
    purity = ((getattr(policy, "three_way", None) or {}).get("reject_purity")) or {}
    if not purity:
        return ""
    tested = (metrics.get("policy") or {}).get("reject_purity") or {}
    head = ("<tr><th>REJECT class</th><th>target</th><th>threshold</th><th>calibration: REJECTs kept, purity</th>"
            "<th>test: decided as it, purity</th></tr>")
    rows = []
    for name, e in purity["classes"].items():
        lo, hi = e["interval"]
        calib = (f"{e['n']} of {e['n_rejected']}, {pct(e['purity'])} <small>[{pct(lo)}, {pct(hi)}]</small>"
                 if e["threshold"] is not None else f"none of {e['n_rejected']}: every REJECT as it goes to REVIEW")
        t = tested.get(name) or {}
        test = (f"{t['of']}, {pct(t['rate'])} <small>[{pct(t['interval'][0])}, {pct(t['interval'][1])}]</small>"
                if t.get("of") else "none")
        rows.append(f"<tr><td>{esc(name)}</td><td>{pct(e['target'])}</td>"
                    f"<td>{'none' if e['threshold'] is None else num(e['threshold'])}</td><td>{calib}</td>"
                    f"<td>{test}</td></tr>")
    what = "P(class)" if purity["score"] == "probability" else "the margin of the class over the next"
    return (f"<p>REJECT purity: a part is rejected as its defect class only when {esc(what)} reaches the class's "
            f"threshold, certified on the calibration images at {pct(purity['confidence'])} for all classes "
            f"together; the others go to REVIEW.</p><table>{head}{''.join(rows)}</table>")
