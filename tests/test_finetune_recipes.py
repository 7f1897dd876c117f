"""Fine-tuning that wastes less: layer-wise learning-rate decay and progressive resizing (training/loop.py)."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import FAST

from defectscope import train
from defectscope.config import ConfigError
from defectscope.models.factory import create_model
from defectscope.training.loop import layerwise_groups, progressive_size


def test_layerwise_groups_decay_from_head_to_stem():
    model = create_model("efficientnet_lite0", 3, image_size=64, pretrained=None)
    params = list(model.parameters())
    groups = layerwise_groups(model, params, 0.5)
    assert sum(len(g["params"]) for g in groups) == len(params)  # nothing left out of the optimizer
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups[0]["params"]} == head and groups[0]["lr_scale"] == 1.0
    scales = [g["lr_scale"] for g in groups]
    assert scales == [0.5 ** k for k in range(len(groups))]
    stem = dict(model.named_parameters())["backbone.conv_stem.weight"]
    assert any(stem is p for p in groups[-1]["params"])  # the stem learns slowest
    only_head = layerwise_groups(model, list(model.head.parameters()), 0.5)
    assert len(only_head) == 1 and only_head[0]["lr_scale"] == 1.0


def test_progressive_size_ramps_to_full_by_half_way():
    sizes = [progressive_size(224, 0.5, e, 8) for e in range(8)]
    assert sizes[0] == 128 and sizes[4:] == [224] * 4
    assert sizes == sorted(sizes) and all(s % 32 == 0 for s in sizes)
    assert progressive_size(224, 0.0, 0, 8) == 224
    assert progressive_size(64, 0.3, 0, 2) == 32  # never below one stride


@pytest.mark.slow
def test_progressive_llrd_run_trains_small_then_validates_full(folder_dataset, tmp_path):
    options = {**FAST, "model.name": "efficientnet_lite0", "model.pretrained": "none", "model.image_size": 64,
               "train.epochs": 4, "train.patience": 0, "train.progressive_resize": 0.5, "train.layer_decay": 0.7}
    run = train(folder_dataset, tmp_path / "run", **options)
    history = pd.read_csv(run / "history.csv")
    assert list(history["train_size"]) == [32, 64, 64, 64]
    assert history["val_macro_f1"].notna().all()


def test_progressive_resizing_refuses_seed_cnns(folder_dataset, tmp_path):
    with pytest.raises(ConfigError, match="progressive_resize"):
        train(folder_dataset, tmp_path / "run", **{**FAST, "train.progressive_resize": 0.5})
