"""Drift scores against direct computations, the conformal threshold, persistence, corruptions, evaluation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from defectscope.data.corruptions import CORRUPTIONS, FAR_DRIFT, corrupt
from defectscope.decision.costs import valeo_pwa
from defectscope.decision.drift import DriftError
from defectscope.decision.drift.fit import (
    calibrate_drift_threshold,
    cost_aware_drift_threshold,
)
from defectscope.decision.drift.scorer import (
    SCORES,
    DriftScorer,
    energy_score,
    fit_mahalanobis,
    knn_score,
    l2_normalise,
    mahalanobis_score,
    msp_score,
)
from defectscope.evaluation.drift_eval import auroc_fpr95
from defectscope.rundir import Run


def test_msp_and_energy_by_formula():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1000.0, 0.0, 0.0]])
    p = np.exp(logits[:2]) / np.exp(logits[:2]).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(msp_score(logits)[:2], -p.max(axis=1))
    assert msp_score(logits)[2] == pytest.approx(-1.0)  # no overflow on huge logits
    np.testing.assert_allclose(energy_score(logits[:2]), -np.log(np.exp(logits[:2]).sum(axis=1)))
    np.testing.assert_allclose(energy_score(logits[:2], 2.0), -2.0 * np.log(np.exp(logits[:2] / 2).sum(axis=1)))
    assert energy_score(logits)[2] == pytest.approx(-1000.0)


def test_mahalanobis_with_identity_covariance_is_squared_euclidean():
    # Offsets of +-sqrt(2) along each axis give a pooled (divide-by-N) covariance of exactly I.
    r = np.sqrt(2.0)
    offsets = np.array([[r, 0], [-r, 0], [0, r], [0, -r]])
    mu = np.array([[0.0, 0.0], [10.0, 0.0]])
    feats = np.concatenate([mu[0] + offsets, mu[1] + offsets])
    labels = np.repeat([0, 1], 4)
    means, precision, _ = fit_mahalanobis(feats, labels, shrinkage=0.0)
    np.testing.assert_allclose(means, mu, atol=1e-12)
    np.testing.assert_allclose(precision, np.eye(2), atol=1e-12)
    x = np.array([[1.0, 2.0], [9.0, -1.0], [5.0, 0.0]])
    np.testing.assert_allclose(mahalanobis_score(x, means, precision), [5.0, 2.0, 25.0])


def test_ledoit_wolf_shrinkage_matches_scikit_learn_and_conditions_the_precision():
    from sklearn.covariance import ledoit_wolf_shrinkage as sk_shrinkage

    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 120)) * rng.uniform(0.01, 3, size=120)  # fewer images than features
    labels = np.arange(40) % 2
    means, precision, s = fit_mahalanobis(feats, labels)
    centred = feats - means[labels]
    assert s == pytest.approx(sk_shrinkage(centred, assume_centered=True), rel=1e-9)
    assert 0 < s < 1
    assert np.linalg.cond(precision) * 100 < np.linalg.cond(fit_mahalanobis(feats, labels, shrinkage=1e-3)[1])


def test_version_1_drift_statistics_load_and_score_as_saved():
    rng = np.random.default_rng(0)
    old = DriftScorer(shrinkage=1e-3).fit(rng.normal(size=(30, 4)).astype(np.float32), None, np.arange(30) % 2)
    arrays, params = old.to_arrays()
    params = {k: v for k, v in params.items() if k != "shrinkage_fitted"} | {"version": 1}
    loaded = DriftScorer.from_arrays(arrays, params)
    assert loaded.shrinkage_fitted == 1e-3
    q = rng.normal(size=(5, 4))
    np.testing.assert_array_equal(loaded.score(q, None, ["mahalanobis"])["mahalanobis"],
                                  old.score(q, None, ["mahalanobis"])["mahalanobis"])


def test_mahalanobis_matches_direct_inverse():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 3)) @ np.array([[2, 0, 0], [0.5, 1, 0], [0, 0.3, 0.5]])
    labels = np.arange(60) % 3
    feats += labels[:, None] * 4.0
    means, precision, _ = fit_mahalanobis(feats, labels, shrinkage=0.0)
    centred = feats - means[labels]
    inv = np.linalg.inv(centred.T @ centred / len(feats))
    x = rng.normal(size=(5, 3))
    direct = np.min([np.einsum("nd,de,ne->n", x - m, inv, x - m) for m in means], axis=0)
    np.testing.assert_allclose(mahalanobis_score(x, means, precision), direct, rtol=1e-8)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(1)
    bank_raw, q = rng.normal(size=(40, 4)), rng.normal(size=(7, 4))
    bank = l2_normalise(bank_raw)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dist = np.linalg.norm(qn[:, None, :] - bank[None].astype(np.float64), axis=2)
    for k in (1, 5, 40):
        np.testing.assert_allclose(knn_score(q, bank, k, chunk=3), np.sort(dist, axis=1)[:, k - 1], atol=1e-5)


def _clusters(rng, n_per_class, centres, spread=1.0):
    feats = np.concatenate([c + spread * rng.normal(size=(n_per_class, len(c))) for c in centres])
    return feats, np.repeat(np.arange(len(centres)), n_per_class)


CENTRES = np.array([[0.0] * 8, [6.0] + [0.0] * 7, [0.0, 6.0] + [0.0] * 6])
HELD_OUT = np.array([0.0, 0.0, 8.0, 8.0] + [0.0] * 4)


@pytest.mark.parametrize("name", ["mahalanobis", "knn"])
def test_calibrated_threshold_holds_the_false_flag_rate(name):
    rng = np.random.default_rng(2)
    feats, labels = _clusters(rng, 200, CENTRES)
    # Shifted centres make the L2-normalised kNN features separable too.
    scorer = DriftScorer(k=10).fit(feats + 3.0, None, labels)
    pool_feats, _ = _clusters(rng, 7000, CENTRES)
    pool = scorer.score(pool_feats + 3.0, None, [name])[name]
    alpha, n, m, draws = 0.05, 199, 500, 400
    rates = []
    for _ in range(draws):
        pick = rng.choice(len(pool), n + m, replace=False)
        t = calibrate_drift_threshold(pool[pick[:n]], alpha)
        rates.append((pool[pick[n:]] > t).mean())
    # Exactly 1 - ceil((n+1)(1-alpha))/(n+1) = 0.05 in expectation; sd of one draw ~ sqrt(a(1-a)/n + a(1-a)/m).
    sd = np.sqrt(alpha * (1 - alpha) * (1 / (n + 2) + 1 / m) / draws)
    assert abs(np.mean(rates) - alpha) < 4 * sd
    held = scorer.score(HELD_OUT + 3.0 + rng.normal(size=(300, 8)), None, [name])[name]
    assert (held > calibrate_drift_threshold(pool[:n], alpha)).mean() >= 0.99


def test_threshold_refused_for_too_few_samples():
    with pytest.raises(DriftError, match="at least 99"):
        calibrate_drift_threshold(np.arange(98.0), 0.01)
    assert calibrate_drift_threshold(np.arange(99.0), 0.01) == 98.0
    assert calibrate_drift_threshold(np.arange(199.0), 0.05) == 189.0  # k = 190, no float round-up to 191
    with pytest.raises(DriftError):
        calibrate_drift_threshold(np.arange(200.0), 0.0)


def test_cost_aware_threshold():
    cm = valeo_pwa(["GOOD", "scratch"], "GOOD")
    # Drift images score 5..9, normal ones 0..4 except one GOOD at 6: flagging it costs 10000.
    s_in = np.array([0, 1, 2, 3, 6.0])
    labels = ["GOOD", "GOOD", "scratch", "scratch", "GOOD"]
    s_dr = np.array([5, 7, 8, 9.0])
    out = cost_aware_drift_threshold(s_in, labels, labels, s_dr, ["GOOD"] * 4, cm)
    # Flagging all drift (t < 5) costs 10000 once; t = 6 misses one drift image (10000) but spares the GOOD.
    assert out["method"] == "cost" and out["threshold"] == 6.0 and out["drift_recall"] == 0.75
    assert out["expected_cost_per_image"] == pytest.approx(10000 / 9)
    fallback = cost_aware_drift_threshold(np.arange(99.0), ["GOOD"] * 99, ["GOOD"] * 99, [], [], cm)
    assert fallback["method"] == "false_flag_rate" and fallback["threshold"] == 98.0


def test_auroc_fpr95():
    auroc, fpr = auroc_fpr95(np.arange(100.0), np.arange(100.0) + 1000)
    assert auroc == 1.0 and fpr == 0.0
    auroc, fpr = auroc_fpr95(np.arange(100.0), np.arange(100.0) - 1000)
    assert auroc == 0.0 and fpr == 1.0


def _empty_run(folder):
    """A run directory with just its (empty) dataset table: enough to hold Drift statistics."""


    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.csv").write_text("path,label,split,source\n")
    return Run(folder)


def test_scorer_round_trips_through_safetensors_and_json(tmp_path):
    rng = np.random.default_rng(3)
    feats, labels = _clusters(rng, 30, CENTRES)
    head = (rng.normal(size=(3, 8)), rng.normal(size=3))
    scorer = DriftScorer(k=7, max_bank=50, seed=4).fit(feats.astype(np.float32), None, labels, head=head)
    assert scorer.bank.shape == (50, 8) and scorer.available == SCORES
    run = _empty_run(tmp_path)
    scorer.save(run)
    assert json.loads((tmp_path / "drift.json").read_text())["k"] == 7
    back = DriftScorer.load(run)
    for a, b in zip(scorer.to_arrays()[0].values(), back.to_arrays()[0].values(), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert back.params() == scorer.params()
    q, logits = rng.normal(size=(5, 8)), rng.normal(size=(5, 3))
    s1, s2 = scorer.score(q, logits), back.score(q, logits)
    assert set(s1) == set(SCORES) and all(np.array_equal(s1[k], s2[k]) for k in SCORES)
    with pytest.raises(DriftError, match="no drift statistics"):
        DriftScorer.load(_empty_run(tmp_path / "nothing"))


def test_corruptions_and_far_drift_images():
    from helpers import make_image

    rng = np.random.default_rng(5)
    images = np.stack([make_image(k, rng, 32) for k in ("GOOD", "scratch", "spot")])
    for name in CORRUPTIONS:
        out = corrupt(images, name, seed=1)
        assert out.shape == images.shape and out.dtype == np.uint8, name
        assert not np.array_equal(out, images), name
        assert np.array_equal(out, corrupt(images, name, seed=1)), name  # seeded
    for name, fn in FAR_DRIFT.items():
        far = fn(4, 32, seed=0)
        assert far.shape == (4, 32, 32) and far.dtype == np.uint8 and far.std() > 10, name


def test_drift_scores_need_no_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from defectscope.decision.drift.scorer import DriftScorer
        from defectscope.decision.policy import Policy, decide
        rng = np.random.default_rng(0)
        s = DriftScorer().fit(rng.normal(size=(30, 4)), None, np.arange(30) % 2)
        from defectscope.rundir import Run
        open({str(tmp_path / "dataset.csv")!r}, "w").write("path,label,split,source\\n")
        s.save(Run({str(tmp_path)!r}))
        s = DriftScorer.load(Run({str(tmp_path)!r}))
        scores = s.score(rng.normal(size=(3, 4)), rng.normal(size=(3, 2)))
        d = decide(rng.normal(size=(3, 2)), Policy(classes=["a", "b"], drift_threshold=-1e9),
                   drift_score=scores["knn"])
        assert list(d.labels) == ["Drift"] * 3
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_fit_drift_and_drift_eval_on_a_run(trained_run, tmp_path):
    from defectscope.decision.drift.fit import fit_drift
    from defectscope.evaluation.drift_eval import drift_eval

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    scorer = fit_drift(run)
    assert (run / "drift.safetensors").is_file() and DriftScorer.load(Run(run)).n_train == scorer.n_train

    report = drift_eval(run, kinds=("corruptions", "far"), n_far=20)
    saved = json.loads((run / "drift_eval.json").read_text())
    assert saved["members"] == [*SCORES, "patch", "photometric"] and set(saved["kinds"]) == {"corruptions", "far"}
    assert "max(knn,patch)" in saved["scores"] and saved["best_score"] in saved["scores"]
    assert set(saved["kinds"]["corruptions"]["parts"]) == set(CORRUPTIONS)
    for kind in saved["kinds"].values():
        for metric in ("auroc", "fpr95"):
            assert set(kind[metric]) == set(saved["scores"])
            assert all(0.0 <= v <= 1.0 for v in kind[metric].values())
    assert max(saved["kinds"]["far"]["auroc"].values()) > 0.5
    assert report["best_score"] == saved["best_score"] == saved["chosen"]["score"]
    # Chosen by its worst kind; each kind left out in turn is judged by a choice made on the other one.
    sel = saved["selection"]
    chosen_worst = min(k["auroc"][sel["chosen"]] for k in saved["kinds"].values())
    assert sel["worst_in_sample"] == pytest.approx(chosen_worst)
    assert chosen_worst == pytest.approx(max(sel["worst_kind_auroc"].values()))
    for held, entry in sel["loko"].items():
        other = next(k for k in saved["kinds"] if k != held)
        assert entry["auroc"] == pytest.approx(saved["kinds"][held]["auroc"][entry["chosen"]])
        assert saved["kinds"][other]["auroc"][entry["chosen"]] == pytest.approx(
            max(saved["kinds"][other]["auroc"].values()))
    for kind, per in saved["chosen"]["per_kind"].items():
        assert per["auroc"] == saved["kinds"][kind]["auroc"][saved["best_score"]]
    # The raw scores behind the metrics, as plain floats: recomputing the metrics gives the JSON's.
    from defectscope.evaluation.drift_eval import auroc_fpr95, load_scores

    with np.load(run / "drift_eval_scores.npz", allow_pickle=False) as z:
        assert all(z[k].dtype == np.float64 for k in z.files)
    raw = load_scores(run / "drift_eval_scores.npz")
    for kind in ("corruptions", "far"):
        assert raw["kinds"][kind]["normal"] is None
        for s in SCORES:
            auroc, fpr = auroc_fpr95(raw["normal"][s], raw["kinds"][kind]["drift"][s])
            assert auroc == pytest.approx(saved["kinds"][kind]["auroc"][s])
            assert fpr == pytest.approx(saved["kinds"][kind]["fpr95"][s])
    assert len(raw["kinds"]["far"]["drift"]["knn"]) == 20 * len(FAR_DRIFT)


@pytest.mark.slow
def test_drift_eval_retrains_for_held_out_class_and_group(trained_run, tmp_path):
    import pandas as pd

    from defectscope.evaluation.drift_eval import drift_eval

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    table = pd.read_csv(run / "dataset.csv", dtype=str, keep_default_na=False)
    table["lot"] = np.where(np.arange(len(table)) % 2, "A", "B")  # a metadata column, as ELPV's type
    table.to_csv(run / "dataset.csv", index=False)
    report = drift_eval(run, kinds=("heldout_class", "group"), group_column="lot", train_value="A",
                        heldout_epochs=1, out=tmp_path / "eval.json")
    assert set(report["kinds"]["heldout_class"]["parts"]) == {"GOOD", "scratch", "spot"}
    assert set(report["kinds"]["group"]["parts"]) == {"lot!=A"}
    assert (run / "drift_eval_runs" / "without_GOOD" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["best_score"] in saved["scores"] and set(saved["selection"]["loko"]) == {"heldout_class", "group"}
    assert set(saved["kinds"]["heldout_class"]["parts"]["GOOD"]["auroc"]) == set(saved["scores"])


def test_vim_matches_the_openood_formula():
    from defectscope.decision.drift.scorer import fit_vim, vim_score

    rng = np.random.default_rng(5)
    # Features with a low-rank structure plus noise, as penultimate features are.
    train = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 12)) + 0.1 * rng.normal(size=(200, 12)) + 1.0
    w, b = rng.normal(size=(3, 12)), rng.normal(size=3)
    stats = fit_vim(train, w, b, dim=4)
    # OpenOOD VIMPostprocessor, written out: origin u = -pinv(W) b; eigenvectors of the covariance of
    # (f - u) (EmpiricalCovariance, assume_centered=True); null space = all but the top `dim`.
    u = -np.linalg.pinv(w) @ b
    cov = (train - u).T @ (train - u) / len(train)
    vals, vecs = np.linalg.eig(cov)
    ns = np.ascontiguousarray(vecs.T[np.argsort(vals * -1)[4:]].T).real
    alpha = (train @ w.T + b).max(axis=1).mean() / np.linalg.norm((train - u) @ ns, axis=-1).mean()
    q = rng.normal(size=(7, 12)) * 2
    logits = q @ w.T + b
    direct = alpha * np.linalg.norm((q - u) @ ns, axis=-1) - np.log(np.exp(logits).sum(axis=1))
    np.testing.assert_allclose(vim_score(q, logits, stats), direct, rtol=1e-4)
    # Off the training subspace the score is higher.
    inside = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 12))
    assert stats["vim.null_space"].shape == (12, 8)
    assert np.median(vim_score(train[:50], train[:50] @ w.T + b, stats)) < np.median(
        vim_score(inside + 5 * rng.normal(size=(50, 12)), (inside) @ w.T + b, stats))
    with pytest.raises(DriftError, match="dimensions"):
        vim_score(q[:, :5], logits, stats)
    with pytest.raises(DriftError, match="needs logits"):
        DriftScorer().fit(train, None, np.arange(200) % 3).score(q, logits, ["vim"])
