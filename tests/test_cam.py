"""The exported graph's Grad-CAM (models/cam.py) against Grad-CAM computed by autograd, and on the line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAST

from defectscope.models.cam import SQRT_FLOOR, CamHead, forward_with_map, supports_cam
from defectscope.models.factory import create_model
from defectscope.models.heads import FeatureNorm, KernelHead, OrdinalHead


def autograd_gradcam(model, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by definition: the identity view's last map weighted by the spatial mean of the decided
    logit's gradient, ReLU, scaled by each image's maximum."""
    from defectscope.models.heads import dihedral

    xn = (x - model.mean) / model.std
    final = model.backbone.forward_features(xn)
    final.retain_grad()
    pooled = model.backbone.forward_head(final, pre_logits=True)
    if model.views != (0,):
        pooled = torch.stack([pooled if k == 0 else model.backbone(dihedral(xn, k)) for k in model.views]).mean(0)
    if isinstance(model.post, FeatureNorm):
        # The same transform with the square root's slope finite at 0 (a channel that is 0 everywhere
        # contributes nothing to either map, so its slope does not matter, but autograd would give inf * 0).
        root = torch.sqrt(torch.clamp(pooled.abs(), min=SQRT_FLOOR))
        z = (torch.sign(pooled) * root - model.post.shift) / model.post.scale
    else:
        z = model.post(pooled)
    logits = model.head(z)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    alpha = final.grad.mean((2, 3))
    cam = torch.relu((alpha[:, :, None, None] * final).sum(1)).detach()
    return cam / (cam.flatten(1).amax(1)[:, None, None] + 1e-12)


def _model(head: str, views=(0,)):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, image_size=64, pretrained=None).eval()
    d = model.num_features
    if head != "linear":
        if head == "rbf":
            score = KernelHead(d, 7, 3, gamma=1.0 / d)
        else:
            score = OrdinalHead(KernelHead(d, 7, 1, gamma=1.0 / d), [2, 0, 1])
            score.cuts.copy_(torch.tensor([-0.5, 0.5]))
        kernel = score if isinstance(score, KernelHead) else score.score
        # Landmarks above the features and positive weights: the decided class's gradient is mostly positive,
        # so the maps are not all zero after the ReLU (random signs often cancel on untrained features).
        kernel.landmarks.normal_().abs_().add_(1.0)
        kernel.linear.weight.data.normal_().abs_()
        model.make_frozen(score)
        post: FeatureNorm = model.post
        post.shift.uniform_(0.0, 0.5)
        post.scale.uniform_(0.5, 2.0)
    model.views = tuple(views)
    return model


@pytest.mark.parametrize("head,views", [("linear", (0,)), ("rbf", (0, 1, 2, 3)), ("ordinal", (0, 4))])
def test_cam_equals_autograd_gradcam(head, views):
    model = _model(head, views)
    assert supports_cam(model)
    x = torch.rand(6, 1, 64, 64)
    with torch.no_grad():
        pooled, z, final = forward_with_map(model, x)
        assert torch.allclose(z, model.forward_features(x), atol=1e-5)
        cam = CamHead(model)(pooled, z, final, model.head(z))
    reference = autograd_gradcam(model, x)
    assert cam.shape == reference.shape == (6, 2, 2)
    assert torch.allclose(cam, reference, atol=1e-4), (cam - reference).abs().max()
    assert (cam.flatten(1).amax(1) > 0.99).any()  # some image has a heatmap at all (each is scaled to max 1)


def test_seed_cnn_has_no_heatmap():
    assert not supports_cam(create_model("seed_cnn1", 2, image_size=32))


@pytest.mark.slow
def test_exported_heatmap_reaches_the_predictor(folder_dataset, tmp_path):
    from defectscope import train
    from defectscope.onnx_export.exporter import export
    from defectscope.runtime.predictor import Predictor

    run = train(folder_dataset, tmp_path / "run", **{**FAST, "model.name": "efficientnet_lite0",
                                                     "model.pretrained": "none", "model.image_size": 64,
                                                     "train.recipe": "frozen", "train.frozen_head": "rbf"})
    report = export(run, tmp_path / "model.onnx", int8=False, select=False)
    parity = [v for v in report.values() if isinstance(v, dict) and "max_abs_diff_heatmap" in v]
    assert parity and parity[0]["max_abs_diff_heatmap"] < 1e-4
    image = next(p for p in sorted(folder_dataset.rglob("*.png")))
    with_map = Predictor(tmp_path / "model.onnx", heatmaps=True).predict(image)
    assert with_map.heatmap is not None and with_map.heatmap.shape == (2, 2)
    top = float(with_map.heatmap.max())  # each map is scaled by its maximum; all 0 when no position is positive
    assert (top == pytest.approx(1.0, abs=1e-5) or top == 0.0) and float(with_map.heatmap.min()) >= 0
    plain = Predictor(tmp_path / "model.onnx").predict(image)
    assert plain.heatmap is None and plain.probabilities == pytest.approx(with_map.probabilities, abs=1e-6)
    ov = Predictor(tmp_path / "model.onnx", heatmaps=True, runtime="openvino").predict(image)
    assert np.abs(ov.heatmap - with_map.heatmap).max() < 1e-3


def test_station_saves_a_viewable_heatmap(tmp_path):
    from PIL import Image

    from defectscope.station.serve.records import HEATMAP_PIXELS, _save_heatmap

    path = _save_heatmap(tmp_path, np.array([[0.0, 1.0], [0.5, 0.25]]), "ab" * 32, "m1")
    with Image.open(path) as im:
        assert im.size == (HEATMAP_PIXELS, HEATMAP_PIXELS) and im.format == "PNG"
        rgb = np.asarray(im.convert("RGB"))
    assert rgb[0, -1, 0] > 200 and rgb[0, -1, 2] < 50  # the hot corner is red
    assert rgb[0, 0, 2] > 200 and rgb[0, 0, 0] < 50  # the cold corner is blue
