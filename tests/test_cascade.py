"""The two-stage cascade: its end-to-end escape guarantee (statistically, on synthetic scores), the run-level
verb, the one-graph ONNX export against the torch composition, and the two-file predictor against the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from defectscope.decision.cascade import cascade_thresholds
from defectscope.decision.thresholds import CalibrationError

CAP, CONF = 0.05, 0.9


def draw(rng: np.random.Generator, n: int, rho: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Screen and classifier P(good) of ``n`` defective parts, correlated through a Gaussian copula (both
    models find the same parts hard), the classifier sharper than the screen."""
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
    u = stats.norm.cdf(z)
    return stats.beta.ppf(u[:, 0], 1.2, 6.0), stats.beta.ppf(u[:, 1], 0.6, 9.0)


@pytest.fixture(scope="module")
def population():
    """A large sample standing in for the true distribution of defective parts' scores."""
    return draw(np.random.default_rng(123), 200_000)


def true_escape(population, t_s: float, t_c: float) -> float:
    s, c = population
    return float(((s >= t_s) | (c >= t_c)).mean())


@pytest.mark.parametrize("method", ["split", "fixed"])
def test_end_to_end_escape_guarantee_holds_statistically(population, method):
    """Over many calibration sets, the true end-to-end escape exceeds the cap in at most about
    (1 - confidence) of them. 300 sets: the bound 0.1 + 3 binomial standard deviations ~ 0.152."""
    rng = np.random.default_rng(7)
    trials, n_def, n_good = 300, 120, 200
    # 'fixed' needs a classifier threshold chosen before the calibration images: a population quantile.
    t_c_fixed = float(np.quantile(population[1], 1 - 0.005))
    violations, refused, screen_pass = 0, 0, []
    for _ in range(trials):
        s_d, c_d = draw(rng, n_def)
        s_g, c_g = rng.beta(8, 1.5, n_good), rng.beta(9, 1.0, n_good)
        s, c = np.concatenate([s_d, s_g]), np.concatenate([c_d, c_g])
        defective = np.arange(len(s)) < n_def
        try:
            r = cascade_thresholds(s, c, defective, max_escape=CAP, confidence=CONF, method=method,
                                   classifier_threshold=t_c_fixed if method == "fixed" else None)
        except CalibrationError:
            refused += 1  # no thresholds, no claim: a refusal never lets a defective part through
            continue
        assert r.empirical_escape <= CAP + 1e-12 or r.escape_ucb <= CAP
        violations += true_escape(population, r.screen_threshold, r.classifier_threshold) > CAP
        screen_pass.append(r.screen_pass_rate_good)
    sd = np.sqrt((1 - CONF) * CONF / trials)
    assert violations / trials <= (1 - CONF) + 3 * sd, f"{violations}/{trials} calibration sets broke the cap"
    assert refused <= trials // 10
    assert np.mean(screen_pass) > 0.3, "the screen should decide a good share of the good parts alone"


def test_naive_empirical_thresholds_do_break_the_cap(population):
    """Guard against a test that cannot fail: thresholds at the empirical cap (no confidence bound) break it
    in far more than 1 - confidence of the calibration sets."""
    rng = np.random.default_rng(11)
    violations, trials = 0, 200
    for _ in range(trials):
        s_d, c_d = draw(rng, 120)
        k = int(CAP / 2 * 120)  # each stage may miss cap/2 of the defective images, empirically
        t_s = np.nextafter(np.sort(s_d)[::-1][k], np.inf)
        t_c = np.nextafter(np.sort(c_d)[::-1][k], np.inf)
        violations += true_escape(population, t_s, t_c) > CAP
    assert violations / trials > (1 - CONF) + 0.1


def test_split_refuses_too_few_defective_images():
    rng = np.random.default_rng(0)
    s, c = rng.random(60), rng.random(60)
    with pytest.raises(CalibrationError, match="defective calibration images"):
        cascade_thresholds(s, c, np.ones(60, bool), max_escape=0.05, confidence=0.95)


def test_fixed_refuses_a_classifier_that_alone_breaks_the_cap():
    rng = np.random.default_rng(0)
    s, c = rng.random(300), rng.random(300)
    with pytest.raises(CalibrationError, match="classifier alone"):
        cascade_thresholds(s, c, np.ones(300, bool), max_escape=0.05, method="fixed", classifier_threshold=0.5)


def test_shares_and_counts_are_consistent():
    rng = np.random.default_rng(3)
    s_d, c_d = draw(rng, 400)
    s = np.concatenate([s_d, rng.beta(8, 1.5, 600)])
    c = np.concatenate([c_d, rng.beta(9, 1, 600)])
    defective = np.arange(1000) < 400
    r = cascade_thresholds(s, c, defective, max_escape=0.05, confidence=0.95)
    passed = (s >= r.screen_threshold) | (c >= r.classifier_threshold)
    assert r.escapes == int((passed & defective).sum()) <= r.screen_misses + r.classifier_misses
    assert r.screen_pass_rate == pytest.approx(float((s >= r.screen_threshold).mean()))
    assert r.escape_ucb <= 0.05
    json.dumps(r.to_dict(), allow_nan=False)


# ---------------------------------------------------------------- runs, export, predictor


FOUR_WAY = {"data.fractions": [0.4, 0.1, 0.4, 0.1]}  # a calib split with enough defective images


@pytest.fixture(scope="module")
def cascade_data(tmp_path_factory):
    from helpers import write_folder_dataset

    return write_folder_dataset(tmp_path_factory.mktemp("cascade_data") / "data", per_class=40, seed=5)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, cascade_data):
    from helpers import FAST

    from defectscope import train

    return train(cascade_data, tmp_path_factory.mktemp("classifier") / "run", **{**FAST, **FOUR_WAY})


@pytest.fixture(scope="module")
def screen_run(tmp_path_factory, cascade_data):
    """A smaller, lower-resolution model on the same data and split as the classifier."""
    from helpers import FAST

    from defectscope import train

    return train(cascade_data, tmp_path_factory.mktemp("screen") / "run",
                 **{**FAST, **FOUR_WAY, "model.name": "seed_cnn1", "model.image_size": 24})


@pytest.fixture(scope="module")
def calibrated(screen_run, classifier_run, tmp_path_factory):
    from defectscope.decision.cascade import cascade

    out = tmp_path_factory.mktemp("cascade") / "cascade_policy.json"
    return cascade(screen_run, classifier_run, out=out, max_escape=0.3, confidence=0.8)


def test_cascade_verb_writes_a_consistent_policy(calibrated):
    from defectscope.decision.cascade import load_cascade_policy

    policy = load_cascade_policy(calibrated["path"])
    g = policy["guarantee"]
    assert g["method"] == "split" and g["escape_ucb"] <= 0.3 + 1e-12
    assert policy["classifier"]["policy"]["escape_threshold"] == g["classifier_threshold"]
    assert policy["screen"]["threshold"] == g["screen_threshold"] and policy["screen"]["image_size"] == 24
    assert policy["calibration"]["n_calib"] == g["n_defective"] + g["n_good"]
    m = policy["calibration_metrics"]
    assert m["escape"] <= g["empirical_escape"] + 1e-12  # REVIEW/Drift only hold more back


def test_screen_that_saw_the_calibration_images_is_refused(classifier_run, tmp_path):
    import shutil

    from defectscope.decision.cascade import cascade

    screen = shutil.copytree(classifier_run, tmp_path / "screen")
    table = (screen / "dataset.csv").read_text().replace(",calib,", ",train,")
    (screen / "dataset.csv").write_text(table)
    with pytest.raises(CalibrationError, match="trained or early-stopped"):
        cascade(screen, classifier_run, out=tmp_path / "c.json", max_escape=0.3, confidence=0.8)


@pytest.fixture(scope="module")
def exports(calibrated, tmp_path_factory):
    from defectscope.onnx_export.cascade_graph import export_cascade

    root = tmp_path_factory.mktemp("cascade_export")
    graph = export_cascade(calibrated["path"], root / "one" / "cascade.onnx", form="graph")
    files = export_cascade(calibrated["path"], root / "two", form="files")
    return root, graph, files


def test_one_graph_matches_the_torch_composition(exports):
    _, graph, files = exports
    for report in (graph, files):
        assert report["parity"]["images"] > 0 and report["parity"]["argmax_mismatches"] == 0
        assert report["parity"]["max_abs_diff_probabilities"] <= 1e-4


def test_two_file_predictor_decides_as_the_one_graph(exports, calibrated, cascade_data):
    from defectscope.decision.cascade import cascade_decide
    from defectscope.runtime.predictor import Predictor

    root, _, _ = exports
    files = sorted(str(p) for p in cascade_data.rglob("*.png"))
    one = Predictor(root / "one" / "cascade.onnx")
    two = Predictor(root / "two" / "cascade.json")
    assert two.classes == one.classes and two.policy == one.policy
    a, b = one.predict_batch(files, 16), two.predict_batch(files, 16)
    assert [p.decision for p in a] == [p.decision for p in b]
    for p, q in zip(a, b, strict=True):
        assert p.probabilities == pytest.approx(q.probabilities, abs=1e-5)
    # The screen passed some parts (one-hot GOOD) and sent others on: both branches were exercised.
    passed = np.array([p.probabilities["GOOD"] == 1.0 for p in b])
    assert 0 < passed.sum() < len(files)
    assert all(p.decision == "GOOD" for p, s in zip(b, passed, strict=True) if s)
    # The two-file runner computes the same decisions as the numpy cascade rule on its own stage outputs.
    runner = two.cascade
    x = np.stack([two.preprocess(f) for f in files])
    p_good = runner.screen.run(["p_good"], {"image": x})[0]
    probs = runner.classifier.run(["probabilities"], {"image": x})[0]
    labels = cascade_decide(p_good, probs, json.loads(Path(calibrated["path"]).read_text()), inputs="probs")
    assert list(labels) == [p.decision for p in b]


def test_cli_cascade_exports_both_forms(screen_run, classifier_run, tmp_path):
    from defectscope.cli import main

    out = tmp_path / "deploy"
    assert main(["cascade", str(screen_run), str(classifier_run), "--max-escape", "0.3", "--confidence", "0.8",
                 "--out", str(tmp_path / "policy.json"), "--export", str(out)]) == 0
    assert {"cascade.json", "screen.onnx", "classifier.onnx", "cascade_graph.onnx"} <= {p.name for p in out.iterdir()}


def test_readme_cascade_commands_parse():
    """The README's cascade commands use flags the CLI has (they are run for real in the tests above)."""
    import re
    import shlex

    from defectscope.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split("## Two-stage cascade", 1)[1].split("\n## ", 1)[0]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S) for line in block.splitlines()]
    assert any(" cascade " in line for line in lines)
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])


def test_two_file_cascade_runs_without_torch(exports, cascade_data):
    import subprocess
    import sys

    root, _, _ = exports
    image = next((cascade_data / "spot").glob("*.png"))
    code = ("import sys; sys.modules['torch'] = None\n"
            "from defectscope.runtime.predictor import Predictor\n"
            f"print(Predictor({str(root / 'two' / 'cascade.json')!r}).predict({str(image)!r}).decision)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in {"GOOD", "scratch", "spot", "REVIEW", "Drift"}
