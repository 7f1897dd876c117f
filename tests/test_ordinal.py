"""The ordinal (cumulative-link) frozen head and the escape cap's choice of score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FAST

from defectscope import train
from defectscope.config import ConfigError
from defectscope.decision.calibrate import calibrate_from_logits
from defectscope.decision.escape_scores import binary_auroc, choose_escape_score, class_ranks_from_order, goodness
from defectscope.decision.policy import Policy, PolicyError, decide
from defectscope.models.heads import OrdinalHead
from defectscope.onnx_export.exporter import export
from defectscope.rundir import Run
from defectscope.training.frozen_features import _ordinal_head, fit_head
from defectscope.training.ordinal import CoralLogit, rank_probabilities

ORDER = ["GOOD", "spot", "scratch"]  # an arbitrary severity order of the test classes, not their sorted order


def ordered_data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 0..3 from a latent score along the first feature plus noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    latent = 2.0 * z[:, 0] + 0.3 * rng.normal(size=n)
    return z, np.digitize(latent, [-1.5, 0.0, 1.5])


def test_coral_logit_learns_the_order_with_ordered_cuts():
    z, r = ordered_data()
    head = CoralLogit(4, C=10.0).fit(z, r)
    assert np.all(np.diff(head.cuts_) > 0)
    assert abs(head.coef_[0]) > 5 * np.abs(head.coef_[1:]).max()  # the score runs along the latent feature
    p = head.predict_proba(z)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    assert (p >= 0).all() and np.mean(head.predict(z) == r) > 0.75
    # warm start from a more regularised fit reaches the same optimum
    warm = CoralLogit(4, C=1.0).fit(z, r).set_params(C=10.0, warm_start=True).fit(z, r)
    np.testing.assert_allclose(warm.coef_, head.coef_, atol=1e-3)


def test_rank_probabilities_are_cumulative_differences():
    p = rank_probabilities(np.array([0.0, 3.0]), np.array([-1.0, 0.5, 2.0]))
    s = 1 / (1 + np.exp(-(np.array([0.0, 3.0])[:, None] - np.array([-1.0, 0.5, 2.0]))))
    np.testing.assert_allclose(p[:, 0], 1 - s[:, 0])
    np.testing.assert_allclose(p[:, 3], s[:, 2])
    np.testing.assert_allclose(p[:, 1], s[:, 0] - s[:, 1])


@pytest.mark.parametrize("kind", ["rbf", "linear"])
def test_ordinal_head_module_equals_the_numpy_fit(kind):
    z, r = ordered_data(120)
    ranks = np.array([2, 0, 3, 1])  # class c sits at rank ranks[c]
    fitted = fit_head(z, r, kind, [1.0, 10.0], 0, num_ranks=4)
    head = _ordinal_head(4, fitted["embedding"], fitted["model"], ranks)
    assert isinstance(head, OrdinalHead)
    expected = fitted["model"].predict_proba(fitted["fitter"].embed(fitted["embedding"], z))[:, ranks]
    with torch.no_grad():
        got = torch.softmax(head(torch.from_numpy(z).float()), 1).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def ordinal_run(folder_dataset, tmp_path_factory):
    return train(folder_dataset, tmp_path_factory.mktemp("ordinal") / "run",
                 **{**FAST, "train.recipe": "frozen", "train.ordinal": True, "data.class_order": ORDER,
                    "train.frozen_c": [1.0, 10.0]})


def test_ordinal_frozen_run_records_reloads_and_exports(ordinal_run, tmp_path):
    spec = json.loads((ordinal_run / "model.json").read_text())
    classes = spec["classes"]
    assert spec["frozen_head"]["ordinal"] is True
    assert spec["frozen_head"]["ranks"] == [ORDER.index(c) for c in classes]
    model = Run(ordinal_run).model()
    assert isinstance(model.head, OrdinalHead) and torch.all(model.head.cuts[1:] >= model.head.cuts[:-1])
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    torch.testing.assert_close(p.sum(1), torch.ones(3), atol=1e-5, rtol=0)
    report = export(ordinal_run, tmp_path / "ordinal.onnx")  # raises unless ONNX matches torch within 1e-4
    assert report["parity"]["max_abs_diff_probabilities"] <= 1e-4


def test_ordinal_needs_a_class_order_and_the_frozen_recipe(folder_dataset, tmp_path):
    with pytest.raises(ConfigError, match="class_order"):
        train(folder_dataset, tmp_path / "a", **{**FAST, "train.recipe": "frozen", "train.ordinal": True})
    with pytest.raises(ConfigError, match="class_order"):
        train(folder_dataset, tmp_path / "b", **{**FAST, "train.ordinal": True, "data.class_order": ORDER})


def test_severity_score_uses_all_the_probability_mass():
    classes = ["bad", "good", "mild"]
    ranks = class_ranks_from_order(classes, ["good", "mild", "bad"])
    assert ranks == [1.0, 0.0, 0.5]
    assert class_ranks_from_order(classes, []) is None
    probs = np.array([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0]])  # same P(good), different severity
    np.testing.assert_allclose(goodness(probs, "p_good", 1, ranks), [0.5, 0.5])
    np.testing.assert_allclose(goodness(probs, "severity", 1, ranks), [0.75, 0.5])
    assert binary_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


def test_escape_score_is_chosen_on_validation_and_used_by_decide():
    rng = np.random.default_rng(0)
    classes = ["bad", "good", "mild"]
    ranks = [1.0, 0.0, 0.5]

    def sample(n):
        # P(good) is pure noise; only the split between mild and bad tells good images apart
        y = rng.integers(0, 3, n)
        p_good = rng.uniform(0.2, 0.4, n)
        bad_share = np.where(y == 1, 0.05, np.where(y == 2, 0.5, 0.95)) + rng.normal(0, 0.05, n)
        bad_share = np.clip(bad_share, 0.01, 0.99)
        probs = np.stack([(1 - p_good) * bad_share, p_good, (1 - p_good) * (1 - bad_share)], 1)
        return np.log(probs), y

    logits, y = sample(400)
    val = sample(300)
    policy, _ = calibrate_from_logits(logits, y, classes, good_class="good", max_escape=0.05, confidence=0.95,
                                      temperature_data=val, temperature_on="val", escape_score="auto",
                                      class_ranks=ranks)
    choice = policy.escape_guarantee["score_choice"]
    assert policy.escape_score == "severity" and choice["on"] == "val"
    assert choice["binary_auroc"]["severity"] > choice["binary_auroc"]["p_good"] + 0.2
    # the policy round-trips through JSON and decide() thresholds the chosen score
    again = Policy.from_json(policy.to_json())
    probs = np.array([[0.05, 0.3, 0.65], [0.65, 0.3, 0.05]])
    d = decide(probs, again, inputs="probs")
    score = goodness(d.probs, "severity", 1, ranks)
    assert list(d.labels == "good") == list(score >= again.escape_threshold)
    # without validation data the choice falls back to P(good); severity without ranks is refused
    plain, _ = calibrate_from_logits(logits, y, classes, good_class="good", max_escape=0.05, escape_score="auto",
                                     class_ranks=ranks)
    assert plain.escape_score == "p_good"
    with pytest.raises(PolicyError, match="class_ranks"):
        Policy(classes=classes, good_class="good", escape_threshold=0.5, escape_score="severity")
    assert choose_escape_score(np.full((4, 3), 1 / 3), np.array([1, 1, 1, 1]), 1, ranks)[0] == "p_good"


def test_the_deployed_predictor_applies_the_severity_score():
    from defectscope.decision.policy import decide_labels as _decide

    classes, ranks = ["bad", "good", "mild"], [1.0, 0.0, 0.5]
    policy = Policy(classes=classes, good_class="good", escape_threshold=0.6, escape_score="severity",
                    class_ranks=ranks)
    probs = np.array([[0.05, 0.5, 0.45], [0.45, 0.5, 0.05]])  # same P(good); severity passes only the first
    assert _decide(probs, json.loads(policy.to_json()), classes) == ["good", "bad"]
