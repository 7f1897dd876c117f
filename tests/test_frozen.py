"""The frozen-feature recipe (fixed backbone + kernel/linear head) and dihedral test-time augmentation."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import FAST

from defectscope import evaluate, train
from defectscope.config import ConfigError
from defectscope.models.factory import create_model
from defectscope.models.heads import FeatureNorm, KernelHead, dihedral, symmetry_views
from defectscope.onnx_export.exporter import export
from defectscope.rundir import Run

SYMMETRIC = {"augment.hflip": True, "augment.vflip": True, "augment.rot90": True}


@pytest.fixture(scope="module")
def frozen_run(folder_dataset, tmp_path_factory):
    return train(folder_dataset, tmp_path_factory.mktemp("frozen") / "run",
                 **{**FAST, **SYMMETRIC, "train.recipe": "frozen", "train.frozen_c": [1.0, 10.0]})


def test_dihedral_views_are_the_d4_group():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    for k in range(8):
        expected = torch.rot90(x, k % 4, dims=(-2, -1))
        expected = expected.flip(-1) if k >= 4 else expected
        assert torch.equal(dihedral(x, k), expected)
    views = {tuple(dihedral(x, k)[0, 0].flatten().tolist()) for k in range(8)}
    assert len(views) == 8
    assert symmetry_views(True, True, True) == tuple(range(8))
    assert symmetry_views(False, False, False) == (0,)
    # the views of two flips form a group: every composition is again one of them
    two = symmetry_views(True, True, False)
    got = {tuple(dihedral(dihedral(x, a), b)[0, 0].flatten().tolist()) for a in two for b in two}
    assert got == {tuple(dihedral(x, k)[0, 0].flatten().tolist()) for k in two}


def test_kernel_head_matches_sklearn_nystroem_logistic_regression():
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 5))
    y = (z[:, 0] + z[:, 1] ** 2 > 1).astype(int) + (z[:, 2] > 0.5)
    ny = Nystroem(gamma=0.2, n_components=60, random_state=0).fit(z)
    lr = LogisticRegression(C=10, max_iter=2000).fit(ny.transform(z), y)
    head = KernelHead(5, 60, 3, gamma=0.2)
    head.landmarks.copy_(torch.from_numpy(ny.components_).float())
    head.linear.weight.data = torch.from_numpy(lr.coef_ @ ny.normalization_).float()
    head.linear.bias.data = torch.from_numpy(lr.intercept_).float()
    with torch.no_grad():
        ours = head(torch.from_numpy(z).float()).double().numpy()
    np.testing.assert_allclose(ours, lr.decision_function(ny.transform(z)), atol=1e-3)


def test_frozen_run_learns_and_records_its_head(frozen_run):
    spec = json.loads((frozen_run / "model.json").read_text())
    assert spec["recipe"] == "frozen" and spec["views"] == list(range(8))
    assert spec["frozen_head"]["kind"] == "rbf" and spec["frozen_head"]["landmarks"] > 0
    assert set(spec["frozen_head"]["cv_macro_f1"]) == {"1", "10"}
    model = Run(frozen_run).model()
    assert isinstance(model.head, KernelHead) and isinstance(model.post, FeatureNorm)
    metrics = evaluate(frozen_run)
    assert metrics["accuracy"] > 0.6  # chance is 1/3


def test_frozen_features_are_invariant_to_the_symmetries(frozen_run):
    model = Run(frozen_run).model()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        a = model(x)
        for k in range(8):
            torch.testing.assert_close(model(dihedral(x, k)), a, atol=1e-4, rtol=1e-4)


def test_frozen_run_exports_with_parity(frozen_run, tmp_path):
    report = export(frozen_run, tmp_path / "frozen.onnx")  # raises unless ONNX matches torch within 1e-4
    assert report["parity"]["max_abs_diff_probabilities"] <= 1e-4


def test_linear_frozen_head_trains(folder_dataset, tmp_path):
    run = train(folder_dataset, tmp_path / "run", **{**FAST, "train.recipe": "frozen", "train.frozen_head": "linear",
                                                     "train.frozen_c": [1.0]})
    spec = json.loads((run / "model.json").read_text())
    assert spec["views"] == [0] and spec["frozen_head"]["landmarks"] == 0
    assert isinstance(Run(run).model().head, torch.nn.Linear)


def test_dihedral_tta_exports_in_the_graph(tmp_path):
    model = create_model("seed_cnn2", 3, image_size=32).eval()
    model.views = symmetry_views(True, True, True)
    x = torch.rand(4, 1, 32, 32)
    path = tmp_path / "tta.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "n"}}, opset_version=17, dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
        single = model.head(model.backbone((x - model.mean) / model.std)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(want, single, atol=1e-4)  # the views really are averaged, not just the identity


def test_finetune_with_tta_saves_its_views(folder_dataset, tmp_path):
    run = train(folder_dataset, tmp_path / "run", **{**FAST, **SYMMETRIC, "train.epochs": 1, "model.tta": True})
    assert json.loads((run / "model.json").read_text())["views"] == list(range(8))
    assert Run(run).model().views == tuple(range(8))


def test_bad_recipe_names_the_key(folder_dataset, tmp_path):
    with pytest.raises(ConfigError, match="train.recipe"):
        train(folder_dataset, tmp_path / "a", **{**FAST, "train.recipe": "magic"})
    with pytest.raises(ConfigError, match="frozen_c"):
        train(folder_dataset, tmp_path / "b", **{**FAST, "train.frozen_c": [0.0]})


def test_auto_recipe_keeps_frozen_without_time_for_a_fine_tune(folder_dataset, tmp_path):
    run = train(folder_dataset, tmp_path / "run", **{**FAST, "train.recipe": "auto", "train.frozen_c": [1.0],
                                                     "train.time_limit_minutes": 1e-4})
    spec = json.loads((run / "model.json").read_text())
    assert spec["recipe"] == "frozen" and spec["auto"]["chosen"] == "frozen"


def test_auto_recipe_compares_on_validation(folder_dataset, tmp_path):
    run = train(folder_dataset, tmp_path / "run", **{**FAST, "train.recipe": "auto", "train.frozen_c": [1.0],
                                                     "train.epochs": 2})
    auto = json.loads((run / "model.json").read_text())["auto"]
    assert auto["chosen"] in ("frozen", "finetune") and 0.0 <= auto["finetune_win_share"] <= 1.0
    assert json.loads((run / "model.json").read_text())["recipe"] == auto["chosen"]


def test_cli_budget_parses_units():
    from defectscope.cli import _minutes

    assert _minutes("15m") == 15 and _minutes("1h") == 60 and _minutes("90s") == 1.5 and _minutes("7") == 7
    with pytest.raises(ValueError, match="budget"):
        _minutes("soon")


def test_a_channel_dead_on_the_training_images_does_not_blow_up_a_new_image():
    """A channel constant on training (dead at a small input size) was divided by 1e-6: a new image lighting it
    up landed 1e5 standard deviations away (one class for everything, a Mahalanobis Drift line of 1e13)."""
    from defectscope.training.frozen_features import power_norm

    rng = np.random.default_rng(0)
    feats = rng.uniform(0, 6, (40, 8))
    feats[:, 3] = 0.0  # dead on every training image
    shift, scale = power_norm(feats)
    live = np.sign(feats) * np.sqrt(np.abs(feats))
    assert np.allclose(scale[[0, 1, 2, 4, 5, 6, 7]], live[:, [0, 1, 2, 4, 5, 6, 7]].std(0))
    assert scale[3] == pytest.approx(np.median(scale[[0, 1, 2, 4, 5, 6, 7]]))
    new = np.full(8, 1.0)  # an image that lights the dead channel a little
    z = (np.sqrt(new) - shift) / scale
    assert abs(z[3]) < 10 and abs(z[3]) <= 3 * np.abs(z).max()
