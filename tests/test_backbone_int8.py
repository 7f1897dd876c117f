"""The int8 backbone stage: NNCF's quantization with the first depthwise convolution kept in float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from defectscope.onnx_export import backbone_int8


class _Stage(nn.Module):
    """A backbone stage in miniature: stem, depthwise, pointwise, pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.dw2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return torch.relu(self.dw2(x)).mean((2, 3))


def _write(tmp_path, module: nn.Module):
    path = tmp_path / "backbone.onnx"
    torch.manual_seed(0)
    module.eval()
    torch.onnx.export(module, torch.rand(2, 1, 16, 16), str(path), input_names=["image"], output_names=["pooled"],
                      dynamic_axes={"image": {0: "n"}, "pooled": {0: "n"}}, dynamo=False)
    return path


def test_the_first_depthwise_convolution_is_found(tmp_path):
    model = onnx.load(str(_write(tmp_path, _Stage())))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    name = backbone_int8.first_depthwise(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert name == convs[1].name  # the stem (group 1) is not it, nor the later depthwise one
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1))
    assert backbone_int8.first_depthwise(onnx.load(str(_write(tmp_path, plain)))) is None


def test_the_int8_backbone_keeps_the_first_depthwise_in_float_and_stays_close(tmp_path):
    pytest.importorskip("nncf")
    import onnxruntime as ort

    src = _write(tmp_path, _Stage())
    dst = tmp_path / "backbone.int8.onnx"
    images = np.random.default_rng(0).random((24, 1, 16, 16), dtype=np.float32)
    report = backbone_int8.quantize_backbone(src, dst, images, [0, 1, 2, 3])
    assert report["engine"].startswith("nncf") and report["calibration_views"] == 96
    graph = onnx.load(str(dst)).graph
    kept = report["first_depthwise_in_float"]
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    assert kept in convs and not dequantized.intersection(convs[kept].input)  # float weights and input
    assert any(dequantized.intersection(n.input) for name, n in convs.items() if name != kept)  # the rest int8
    f32 = ort.InferenceSession(str(src)).run(None, {"image": images})[0]
    i8 = ort.InferenceSession(str(dst)).run(None, {"image": images})[0]
    assert np.abs(i8 - f32).max() <= 0.05 * np.abs(f32).max()


def test_without_nncf_the_backbone_falls_back_to_onnx_runtime(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone_int8, "nncf_available", lambda: False)
    src = _write(tmp_path, _Stage())
    dst = tmp_path / "backbone.int8.onnx"
    report = backbone_int8.quantize_backbone(src, dst, np.random.default_rng(0).random((8, 1, 16, 16),
                                                                                     dtype=np.float32), [0, 2])
    assert report["engine"] == "onnxruntime" and report["calibration_images"] == 16  # 8 images x 2 views
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(dst)).graph.node)
