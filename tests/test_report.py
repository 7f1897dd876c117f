"""The evaluation report: self-contained HTML, plot files, curve numbers, ECE and Grad-CAM."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope import evaluate
from defectscope.evaluation.curves import expected_calibration_error, report_metrics
from defectscope.evaluation.report import report_from_run, write_report
from defectscope.metrics import classification_metrics


def synthetic(tmp_path: Path, k: int, per_class: int, seed: int = 0, missing: int | None = None):
    """Noisy-but-informative probabilities for ``k`` classes, tiny PNGs on disk; class ``missing`` absent."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), per_class)
    if missing is not None:
        y = y[y != missing]
    logits = rng.normal(0, 1, (len(y), k))
    logits[np.arange(len(y)), y] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    paths = []
    for i in range(len(y)):
        p = img_dir / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return probs, y, paths


def check_self_contained(page: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*["\']?https?://', page)
    assert "<link" not in page and "<script" not in page
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def run_report(tmp_path, probs, y, paths, classes, policy=None, **kw):
    metrics = classification_metrics(y, probs.argmax(1), classes)
    if policy is not None:
        from defectscope.decision.outcomes import apply_policy_metrics

        metrics["policy"] = apply_policy_metrics(y, probs, policy, classes, inputs="probs")
    out = tmp_path / "out"
    html = write_report(None, metrics=metrics, probs=probs, y_true=y, paths=paths, classes=classes,
                        out_dir=out, policy=policy, **kw)
    return html, out


def test_report_two_classes(tmp_path):
    from defectscope.decision.policy import Policy

    probs, y, paths = synthetic(tmp_path, 2, 15)
    classes = ["GOOD", "defect"]
    policy = Policy(classes=classes, good_class="GOOD", review_threshold=0.7)
    html, out = run_report(tmp_path, probs, y, paths, classes, policy=policy)
    page = html.read_text()
    check_self_contained(page)
    for name in ("confusion_counts", "confusion_normalized", "roc", "pr", "reliability", "gallery_mistakes",
                 "gallery_unsure_correct", "review_tradeoff"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 0, name
    assert "defective parts would have been passed as GOOD at the chosen operating point" in page
    assert "would be sent to a person" in page and "the policy&#x27;s temperature" in page
    assert "No model was given" in page
    numbers = json.loads((out / "report_metrics.json").read_text())
    assert set(numbers["roc_auc"]) == set(classes) and numbers["ece_bins"] == 15


def test_report_twenty_classes_with_an_absent_class(tmp_path):
    from sklearn.metrics import roc_auc_score

    classes = [f"c{i:02d}" for i in range(20)]
    probs, y, paths = synthetic(tmp_path, 20, 4, missing=7)
    html, out = run_report(tmp_path, probs, y, paths, classes)
    check_self_contained(html.read_text())
    numbers = json.loads((out / "report_metrics.json").read_text())
    assert numbers["roc_auc"]["c07"] is None and "c07" in numbers["curves_skipped"]
    for k, name in enumerate(classes):
        if k != 7:
            assert numbers["roc_auc"][name] == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=1e-12)
    assert (out / "plots" / "roc.png").is_file()


def test_curve_numbers_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    y = np.array([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])
    probs = rng.dirichlet(np.ones(3), len(y))
    numbers = report_metrics(probs, y, ["a", "b", "c"])
    for k, name in enumerate("abc"):
        assert numbers["roc_auc"][name] == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=1e-12)
        assert numbers["average_precision"][name] == pytest.approx(average_precision_score(y == k, probs[:, k]))
    assert numbers["macro_roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_ece_by_hand():
    # Top confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.55 (wrong).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.55, 0.45]])
    y = np.array([0, 1, 0, 1])
    # Bins of width 1/15: 0.9 -> (0.8667, 0.9333]; 0.6 -> (0.5333, 0.6]; 0.55 -> (0.5333, 0.6].
    # bin A: 2 images, accuracy 0.5, confidence 0.9; bin B: 2 images, accuracy 0.5, confidence 0.575.
    expected = 2 / 4 * abs(0.5 - 0.9) + 2 / 4 * abs(0.5 - 0.575)
    assert expected_calibration_error(probs, y) == pytest.approx(expected)
    assert report_metrics(probs, y, ["a", "b"])["ece"] == pytest.approx(expected)
    # A confidence of exactly 0.6 = 9/15 sits in the bin whose upper edge it is, (8/15, 9/15].
    bins = report_metrics(probs, y, ["a", "b"])["reliability"]
    assert bins["count"][8] == 2 and bins["count"][13] == 2


def test_gradcam_on_trained_model_and_report(tmp_path, trained_run):
    import torch

    from defectscope.evaluation.gradcam import gradcam_maps, target_layer
    from defectscope.rundir import Run

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    model, spec = Run(run).model(), Run(run).spec
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = spec["image_size"]
    img = np.full((size, size), 90, np.uint8)
    img[10:13, 3:-3] = 230  # a scratch
    with torch.no_grad():  # as inside evaluate: Grad-CAM must switch gradients on itself
        maps = gradcam_maps(model, img[None], [1])
    assert maps.shape == (1, size, size) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert target_layer(model)[1] == "backbone.features.3"

    # The way the lead wires it: evaluate, then the report from the run's evaluation files.
    evaluate(run)
    html = report_from_run(run, gradcam_per_class=2)
    out = html.parent
    page = html.read_text()
    check_self_contained(page)
    assert "backbone.features.3" in page and (out / "plots" / "gradcam_classes.png").is_file()
    assert (out / "plots" / "training.png").is_file()
    assert json.loads((out / "report_metrics.json").read_text())["gradcam"]["images"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradcam_failure_is_a_note(tmp_path):
    import torch

    probs, y, paths = synthetic(tmp_path, 2, 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 2))  # no Conv2d anywhere
    html, out = run_report(tmp_path, probs, y, paths, ["a", "b"], model=model, spec={"image_size": 12})
    assert "Grad-CAM could not be computed" in html.read_text()
    assert json.loads((out / "report_metrics.json").read_text())["gradcam"]["error"]


def test_report_without_drift_gives_the_hint(tmp_path):
    probs, y, paths = synthetic(tmp_path, 2, 4)
    run = tmp_path / "run"  # a run folder without drift_eval.json, and no policy
    run.mkdir()
    out = tmp_path / "out"
    html = write_report(run, metrics=classification_metrics(y, probs.argmax(1), ["GOOD", "defect"]), probs=probs,
                        y_true=y, paths=paths, classes=["GOOD", "defect"], out_dir=out)
    page = html.read_text()
    assert "10. Drift" in page and "Drift is not measured for this run" in page
    assert "defectscope drift-eval RUN" in page and "defectscope calibrate RUN" in page
    assert not list((out / "plots").glob("drift_*.png"))


def _drift_eval_json(scores, kinds):
    auroc = {"corruptions": [0.61, 0.72, 0.93, 0.88, 0.64], "far": [0.55, 0.66, 0.99, 0.97, 0.58],
             "heldout_class": [0.51, 0.52, 0.71, 0.69, 0.6]}
    auroc = {k: v[:len(scores)] for k, v in auroc.items()}
    out = {"scores": list(scores), "best_score": "mahalanobis", "kinds": {}, "mean_auroc": {}}
    for kind in kinds:
        out["kinds"][kind] = {"auroc": dict(zip(scores, auroc[kind], strict=True)),
                              "fpr95": dict(zip(scores, [0.9, 0.8, 0.123, 0.2, 0.7][:len(scores)], strict=True)),
                              "n_normal": 200, "n_drift": 50}
    for i, s in enumerate(scores):
        out["mean_auroc"][s] = float(np.mean([auroc[k][i] for k in kinds]))
    return out


def test_report_drift_section_from_synthetic_files(tmp_path):
    from defectscope.decision.drift.scorer import SCORES
    from defectscope.decision.outcomes import apply_policy_metrics
    from defectscope.decision.policy import Policy
    from defectscope.evaluation.drift_eval import load_scores, save_scores

    rng = np.random.default_rng(7)
    probs, y, paths = synthetic(tmp_path, 2, 100)
    classes = ["GOOD", "defect"]
    run = tmp_path / "run"
    run.mkdir()
    kinds = ("corruptions", "far", "heldout_class")
    (run / "drift_eval.json").write_text(json.dumps(_drift_eval_json(SCORES, kinds)))
    normal = {s: rng.normal(10, 2, 200) for s in SCORES}
    drift = {k: {s: rng.normal(20, 3, 50) for s in SCORES} for k in kinds}
    save_scores(run / "drift_eval_scores.npz", normal,
                {"corruptions": {"drift": drift["corruptions"]}, "far": {"drift": drift["far"]},
                 "heldout_class": {"drift": drift["heldout_class"], "normal": {s: rng.normal(5, 1, 30)
                                                                               for s in SCORES}}})
    back = load_scores(run / "drift_eval_scores.npz")
    assert np.array_equal(back["normal"]["knn"], normal["knn"]) and back["kinds"]["far"]["normal"] is None
    assert set(back["kinds"]["heldout_class"]["normal"]) == set(SCORES)

    threshold = 14.0
    policy = Policy(classes=classes, good_class="GOOD", drift_threshold=threshold,
                    drift={"score": "mahalanobis", "target_false_flag_rate": 0.01, "n_calibration": 150,
                           "calibration_flag_rate": 0.02, "threshold_fit": {"method": "false_flag_rate"},
                           "rate_support": {"requested_rate": 0.01, "n_calibration": 150, "supported": True,
                                            "guaranteed_rate": 0.01, "images_needed": 99, "per_10000": 100}})
    eval_scores = np.where(np.arange(len(y)) % 10 == 0, 30.0, 1.0)  # every tenth image is Drift
    metrics = classification_metrics(y, probs.argmax(1), classes)
    metrics["policy"] = apply_policy_metrics(y, probs, policy, classes, inputs="probs", drift_score=eval_scores)
    out = tmp_path / "out"
    html = write_report(run, metrics=metrics, probs=probs, y_true=y, paths=paths, classes=classes, out_dir=out,
                        policy=policy)
    page = html.read_text()
    check_self_contained(page)
    assert "10. Drift" in page and "Drift is not measured" not in page
    # What the threshold flags.
    assert "1% false-flag rate: about 1 in 100 normal parts will be set aside as Drift" in page
    # The line on the drift_score scale that predict, the sorter and the dashboard print; its raw value is
    # policy.json's business (a Mahalanobis line can be 2.75e13), explained once.
    assert "<td>threshold</td><td>drift_score 1.00</td>" in page
    assert "14.000000" not in page and "threshold 14" not in page
    assert page.count("1.0 is the line, 2.0 twice as far from normal") == 1
    assert "3 of 150 normal calibration images" in page
    assert "about 100 normal parts a day set aside per 10,000" in page
    assert "20 of 200 evaluated images were set aside as Drift" in page
    # The AUROC / FPR@95 table, best score marked.
    assert "0.930 / 12.30%" in page and "0.990 / 12.30%" in page and "0.710 / 12.30%" in page
    assert "<b>0.930 / 12.30%</b>" in page and "best, policy" in page
    # One histogram per kind, embedded; the threshold only where the run's own model scored.
    for kind in kinds:
        assert (out / "plots" / f"drift_{kind}.png").stat().st_size > 0
        assert re.search(rf'<img alt="drift histogram {kind}" src="data:image/png;base64,', page)
    assert "threshold does not apply: 1.0 here is the line flagging 1% of these normal images" in page
    numbers = json.loads((out / "report_metrics.json").read_text())["drift"]
    assert numbers["histograms"] == list(kinds) and numbers["drift_eval"]
    flags = numbers["threshold_flags"]
    assert set(flags) == {"normal", "corruptions", "far"}
    assert flags["far"] == pytest.approx(np.mean(drift["far"]["mahalanobis"] > threshold))
    assert flags["normal"] == pytest.approx(np.mean(normal["mahalanobis"] > threshold))


def test_report_drift_section_from_a_real_drift_eval(tmp_path, trained_run):
    from defectscope.decision.drift.scorer import SCORES
    from defectscope.evaluation.drift_eval import drift_eval

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    result = drift_eval(run, kinds=("far",), n_far=10)
    with np.load(run / "drift_eval_scores.npz", allow_pickle=False) as z:
        fused = [result["best_score"]] if result["chosen"]["rule"] != "single" else []
        shown = [*SCORES, "patch", "photometric", *fused]
        assert set(z.files) == {f"{w}__{s}" for w in ("normal", "far") for s in shown}
        assert len(z["far__knn"]) == 20  # n_far images of each far kind
    probs, y, paths = synthetic(tmp_path, 3, 3)
    html = write_report(run, metrics=classification_metrics(y, probs.argmax(1), ["GOOD", "scratch", "spot"]),
                        probs=probs, y_true=y, paths=paths, classes=["GOOD", "scratch", "spot"],
                        out_dir=tmp_path / "out")
    page = html.read_text()
    best = result["best_score"]
    assert f"{result['kinds']['far']['auroc'][best]:.3f} / " in page
    assert '<img alt="drift histogram far"' in page and "The policy has no Drift flag" in page
    # The chosen score per kind, in its own table; one kind leaves nothing out, and the page says so.
    assert f"The chosen Drift score: {best}" in page.replace("&#x27;", "'")
    assert "one kind only" in page


def test_drift_histogram_on_the_drift_score_scale():
    from defectscope.decision.policy import relative_drift
    from defectscope.evaluation import plots

    rng = np.random.default_rng(0)
    line = 2.75e13  # a raw Mahalanobis line of the kind the issue met
    normal = relative_drift(rng.uniform(1e10, 2e13, 100), line)
    drift = relative_drift(rng.uniform(3e13, 9e13, 30), line)
    fig = plots.drift_histogram(normal, drift, score="mahalanobis", kind="far", threshold=1.0,
                                threshold_label="the policy's line (drift_score 1.00)", relative=True)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("drift_score (mahalanobis; 1.0 = the Drift line")
    assert max(abs(t) for t in ax.get_xlim()) < 10  # the axis is read in multiples of the line, not in 1e13
    assert [tuple(ln.get_xdata()) for ln in ax.get_lines()] == [(1.0, 1.0)]


def test_report_drift_small_calibration_and_chosen_score(tmp_path):
    """A small calibration set: the page says the rate it guarantees and the images 1% needs; the chosen
    (fused) score's AUROC per kind and its leave-one-kind-out check are shown."""
    from defectscope.decision.drift.support import rate_support
    from defectscope.decision.policy import Policy

    probs, y, paths = synthetic(tmp_path, 2, 20)
    classes = ["GOOD", "defect"]
    run = tmp_path / "run"
    run.mkdir()
    fused = "max(knn,patch)"
    ev = _drift_eval_json(("knn", "patch", fused), ("far", "heldout_class"))
    ev |= {"members": ["knn", "patch"], "best_score": fused,
           "chosen": {"score": fused, "members": ["knn", "patch"], "rule": "max",
                      "per_kind": {"far": {"auroc": 0.987, "fpr95": 0.04}, "heldout_class": {"auroc": 0.612,
                                                                                           "fpr95": 0.83}}},
           "selection": {"chosen": fused, "worst_in_sample": 0.612, "loko_worst": 0.543,
                         "loko": {"far": {"chosen": "knn", "auroc": 0.9}, "heldout_class": {"chosen": "patch",
                                                                                            "auroc": 0.543}}}}
    (run / "drift_eval.json").write_text(json.dumps(ev))
    support = rate_support(49, 0.01)
    policy = Policy(classes=classes, good_class="GOOD", drift_threshold=2.5,
                    drift={"score": fused, "members": ["knn", "patch"], "target_false_flag_rate": 0.01,
                           "n_calibration": 49, "calibration_flag_rate": 0.0, "rate_support": support,
                           "threshold_fit": {"method": "false_flag_rate"}})
    html = write_report(run, metrics=classification_metrics(y, probs.argmax(1), classes), probs=probs, y_true=y,
                        paths=paths, classes=classes, out_dir=tmp_path / "out", policy=policy)
    page = html.read_text()
    assert "about 200 normal parts a day set aside per 10,000" in page  # 1/(49 + 1)
    assert "needs at least 99 normal images" in page
    assert "The largest of 2 scores, each standardised on the validation images" in page
    assert "The chosen Drift score: max(knn,patch)" in page
    assert "<td>0.987</td><td>4.00%</td>" in page and "<td>0.612</td><td>83.00%</td>" in page
    assert "<b>0.543</b>, is the honest expectation" in page


def test_an_ece_from_few_images_carries_a_caution():
    from defectscope.evaluation.report.charts import ECE_MIN_IMAGES, ece_caution

    assert "Caution: 35 images in 15 bins" in ece_caution(35)
    assert ece_caution(ECE_MIN_IMAGES) == ""


def test_headline_states_one_interval_level_once():
    import re

    import numpy as np

    from defectscope.evaluation.curves import raw_escape
    from defectscope.evaluation.report.summary import headline

    classes = ["GOOD", "crack"]
    y = np.array([0] * 30 + [1] * 20)
    probs = np.tile([0.8, 0.2], (50, 1))
    probs[40:] = [0.1, 0.9]
    metrics = {"n": 50, "accuracy": 0.8, "macro_f1": 0.7, "balanced_accuracy": 0.75, "worst_class": "crack",
               "worst_class_f1": 0.6, "per_class": {c: {"support": 25} for c in classes},
               "policy": {"n": 50, "review_rate": 0.1,
                          "escape": {"rate": 0.1, "count": 2, "of": 20, "interval": [0.01, 0.3], "confidence": 0.9},
                          "overkill": {"rate": 0.0, "count": 0, "of": 30, "interval": [0.0, 0.1], "confidence": 0.9}}}
    page = headline(metrics, raw_escape(probs, y, classes))  # the raw rates come at 95%, the policy's at 90%
    assert re.findall(r"\d+% confidence intervals", page) == ["90% confidence intervals"]
    assert " at 9" not in page  # no level repeated per row
    raw_row = re.search(r"escape rate, raw model</td><td>50.00% <small>\[([\d.]+)%", page)
    assert raw_row and float(raw_row.group(1)) > 27.2  # 10 of 20 at 90%: narrower than the 95% bound 27.2%


def test_a_run_fitted_once_shows_its_validation_scores_not_a_dot_on_an_epoch_axis():
    import pandas as pd
    from matplotlib import pyplot as plt

    from defectscope.evaluation import plots

    once = plots.training_curves(pd.DataFrame({"epoch": [0], "val_macro_f1": [0.56], "val_accuracy": [0.78]}))
    assert len(once.axes) == 1 and "no epochs" in once.axes[0].get_title()
    assert sorted(t.get_text() for t in once.axes[0].texts) == ["0.560", "0.780"]
    curve = plots.training_curves(pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.0, 0.8, 0.6],
                                                "val_macro_f1": [0.3, 0.5, 0.6], "best_epoch": [2, 2, 2]}))
    assert len(curve.axes) == 2 and len(curve.axes[1].get_lines()) >= 1
    plt.close("all")


def test_grid_captions_clear_the_row_above():
    """Grad-CAM of mistakes: a three-line caption of the second row overlapped the first row's images."""
    from defectscope.evaluation import plots

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (160, 160), dtype=np.uint8) for _ in range(12)]
    captions = ["true Crack_heavy\n-> functional p=0.93\n(no region stands out)"] * 12
    fig = plots.image_grid(images, captions, overlays=[rng.uniform(0, 1, (160, 160)) for _ in range(12)], ncols=6,
                           title="Grad-CAM of the most confident mistakes, towards the predicted class")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = np.array(fig.axes).reshape(2, 6)
    for col in range(6):
        above = axes[0, col].get_window_extent(renderer)
        title = axes[1, col].title.get_window_extent(renderer)
        assert title.y1 <= above.y0, (col, title, above)  # display coordinates grow upwards
    top_titles = max(ax.title.get_window_extent(renderer).y1 for ax in axes[0])
    assert top_titles <= fig._suptitle.get_window_extent(renderer).y0
