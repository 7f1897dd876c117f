from __future__ import annotations

import pytest
import torch

from defectscope.models.factory import ModelError, create_model, list_models


@pytest.mark.parametrize("name,size,features", [("seed_cnn1", 64, 64), ("seed_cnn2", 64, 128), ("seed_cnn3", 64, 64)])
def test_seed_cnns_follow_the_die_bridge_recipe(name, size, features):
    model = create_model(name, 6, image_size=size)
    x = torch.rand(2, 1, size, size)
    assert model(x).shape == (2, 6)
    assert model.forward_features(x).shape == (2, features)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == {"seed_cnn1": [64], "seed_cnn2": [32, 64],
                                               "seed_cnn3": [32, 64, 128]}[name]
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100", "efficientnet_lite0"])
def test_timm_models_take_one_channel_and_expose_features(name):
    model = create_model(name, 3, pretrained=None).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features)
        assert torch.allclose(model.head(feats), model(x), atol=1e-5)
    groups = model.param_groups()
    assert len(groups) >= 3 and groups[-1] == ["head.weight", "head.bias"]
    names = {n for n, _ in model.named_parameters()}
    assert set().union(*map(set, groups)) == names


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match="unknown model 'resnet_99'.*seed_cnn1"):
        create_model("resnet_99", 2)


def test_seed_cnn_has_no_pretrained_weights():
    with pytest.raises(ModelError, match="no pretrained"):
        create_model("seed_cnn1", 2, pretrained="package")


def test_package_weights_set_their_own_normalisation():
    model = create_model("efficientnet_lite0", 2, pretrained="package")
    assert model.pretrained_report["source"] == "package"
    assert float(model.mean) == pytest.approx(127 / 255) and float(model.std) == pytest.approx(128 / 255)


def test_list_models_filters():
    names = list_models("seed_*")
    assert names == ["seed_cnn1", "seed_cnn2", "seed_cnn3"]
    assert "resnet18" in list_models("*resnet*")
