from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from defectscope.metrics import classification_metrics, format_metrics


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    m = classification_metrics(y, p, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, p, average="weighted"))
    f1 = skm.f1_score(y, p, average=None)
    assert m["worst_class_f1"] == pytest.approx(f1.min())
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p).tolist()
    assert np.allclose(np.array(m["confusion_matrix_normalized"]).sum(1), 1)


def test_majority_class_trap_is_visible():
    y = np.array([0] * 95 + [1] * 5)
    m = classification_metrics(y, np.zeros(100, int), ["GOOD", "defect"])
    assert m["accuracy"] == 0.95
    assert m["worst_class"] == "defect" and m["worst_class_f1"] == 0.0
    assert m["balanced_accuracy"] == 0.5
    assert "defect" in format_metrics(m)


def test_the_printed_confusion_matrix_names_every_class_whole():
    classes = ["defective", "functional", "likely_defective", "possibly_defective"]
    y = np.array([0, 1, 2, 3, 3])
    text = format_metrics(classification_metrics(y, np.array([0, 1, 2, 3, 1]), classes))
    head = text.splitlines()[text.splitlines().index("confusion matrix (rows true, columns predicted):") + 1]
    assert head.split() == classes
    rows = text.splitlines()[-4:]
    assert all(len(r) == len(head) for r in rows) and rows[-1].split() == ["possibly_defective", "0", "1", "0", "1"]
