"""EMA of the weights in the fine-tuning loop (train.ema_decay)."""

from __future__ import annotations

import pytest
import torch
from helpers import FAST, train_interrupted_after
from safetensors.torch import load_file
from torch import nn

from defectscope import train
from defectscope.config import ConfigError
from defectscope.training.ema import WeightEMA

EMA = {**FAST, "train.epochs": 3, "train.ema_decay": 0.9}


def test_ema_equals_the_analytic_average_of_a_step_sequence():
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    ema, d = WeightEMA(layer, 0.8), 0.8
    steps = [1.0, -3.0, 4.0, 0.5]
    for w in steps:
        with torch.no_grad():
            layer.weight.fill_(w)
        ema.update(layer)
    # ema_n = d^n w_0 + sum_i (1 - d) d^(n - i) w_i
    n = len(steps)
    expected = d ** n * 2.0 + sum((1 - d) * d ** (n - i) * w for i, w in enumerate(steps, start=1))
    assert ema.state_dict()["weight"].item() == pytest.approx(expected, rel=1e-6)
    with ema.applied(layer):
        assert layer.weight.item() == pytest.approx(expected, rel=1e-6)
    assert layer.weight.item() == 0.5  # the raw weights are back


def test_ema_run_saves_the_averaged_weights(folder_dataset, tmp_path):
    run = train(folder_dataset, tmp_path / "run", **EMA)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)  # the EMA state keeps it weights_only
    raw, ema, best = saved["model"], saved["ema"], saved["best_weights"]
    floats = [k for k, v in raw.items() if v.is_floating_point()]
    assert any(not torch.allclose(raw[k], ema[k]) for k in floats)  # the average is not the last step
    weights = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(weights[k], best[k]) for k in weights)
    if saved["state"]["best_epoch"] == saved["state"]["epoch"]:  # best = last epoch: the saved model is the EMA
        assert all(torch.equal(weights[k], ema[k]) for k in weights)
    with pytest.raises(ConfigError, match="ema_decay"):
        train(folder_dataset, tmp_path / "bad", **{**FAST, "train.ema_decay": 1.0})


@pytest.mark.slow
def test_resume_with_ema_gives_identical_weights(folder_dataset, tmp_path):
    full = train(folder_dataset, tmp_path / "full", **EMA)
    train_interrupted_after(2, folder_dataset, tmp_path / "part", **EMA)
    resumed = train(out=tmp_path / "part", resume=True)
    wf, wr = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    ef = torch.load(full / "checkpoint.pt", weights_only=True)["ema"]
    er = torch.load(resumed / "checkpoint.pt", weights_only=True)["ema"]
    assert all(torch.equal(ef[k], er[k]) for k in ef)
