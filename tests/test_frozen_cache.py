"""train.cache_frozen: a phase's frozen early blocks computed once, epochs over the later blocks only."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import FAST

from defectscope import train
from defectscope.config import ConfigError, PhaseConfig, build_config
from defectscope.models.factory import create_model
from defectscope.models.heads import dihedral
from defectscope.training.cached_blocks import FrozenPrefixCache, frozen_blocks
from defectscope.training.loop import Trainer, set_trainable

LITE = {"model.name": "tf_efficientnet_lite0", "model.pretrained": "none", "model.drop_rate": 0.0}
PHASES = [{"unfreeze": "head", "epochs": 1, "lr": 3e-3}, {"unfreeze": "last:2", "epochs": 1, "lr": 1e-3},
          {"unfreeze": "all", "epochs": 1, "lr": 1e-3}]


def _lite(k: int = 3):
    torch.manual_seed(0)
    return create_model("tf_efficientnet_lite0", k, image_size=32, pretrained=None)


def _images(n: int = 40, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    x = rng.integers(0, 255, (n, size, size)).astype(np.uint8)
    x[y == 1, 10:14, :] = 255  # a bright line
    return x, y


def test_frozen_blocks_follow_the_phase():
    model = _lite()
    set_trainable(model, "head")
    assert frozen_blocks(model) == 7
    set_trainable(model, "last:2")
    # timm groups the last stage with the head convolution: stages 5 and 6 and the classifier train
    assert frozen_blocks(model) == 5
    set_trainable(model, "all")
    assert frozen_blocks(model) == 0
    seed = create_model("seed_cnn2", 3, image_size=32)
    set_trainable(seed, "head")
    assert frozen_blocks(seed) == 0  # not an EfficientNet: never cached


def test_cache_holds_every_view_and_draws_them_uniformly():
    model = _lite().eval()
    set_trainable(model, "last:2")
    x, _ = _images(6)
    augment = build_config(overrides={"augment.rot90": True}).augment
    cache = FrozenPrefixCache.build(model, torch.from_numpy(x), augment, device=torch.device("cpu"))
    assert cache.views == (0, 1, 2, 3) and cache.maps.shape[:2] == (4, 6)
    bb = model.backbone
    prefix = torch.nn.Sequential(bb.conv_stem, bb.bn1, *list(bb.blocks)[:5])
    xn = (torch.from_numpy(x).float().div(255).unsqueeze(1) - model.mean) / model.std
    with torch.no_grad():
        for v, k in enumerate(cache.views):
            torch.testing.assert_close(cache.maps[v], prefix(dihedral(xn, k)), atol=1e-5, rtol=1e-5)
    gen = torch.Generator().manual_seed(0)
    drawn = torch.stack([cache.take(torch.zeros(1, dtype=torch.long), gen)[0] for _ in range(200)])
    hits = [int((drawn - cache.maps[v, 0]).abs().flatten(1).amax(1).lt(1e-6).sum()) for v in range(4)]
    assert sum(hits) == 200 and min(hits) > 25  # every view drawn, about a quarter each


def test_cached_phase_trains_exactly_like_the_uncached_one(tmp_path):
    """Augmentation off: one epoch with the cache gives the same weights as one without (same batches)."""
    x, y = _images()
    cfg = build_config(overrides={**LITE, "model.image_size": 32, "train.batch_size": 8, "train.patience": 0,
                                  "train.progress": False, "augment.photometric": False, "train.warmup_epochs": 0,
                                  "train.channels_last": False})
    cfg.train.phases = [PhaseConfig(unfreeze="last:2", epochs=1, lr=1e-2)]
    start = _lite()
    results = []
    for cached in (False, True):
        cfg.train.cache_frozen = cached
        run_dir = tmp_path / f"cached_{cached}"
        run_dir.mkdir()
        trainer = Trainer(copy.deepcopy(start), cfg, run_dir, ["a", "b", "c"])
        state = trainer.fit(x[:32], y[:32], x[32:], y[32:])
        results.append((trainer.model.state_dict(), state.history[0]))
    (plain, h0), (cached_sd, h1) = results
    assert h0["cached_blocks"] == 0 and h1["cached_blocks"] == 5
    assert h1["train_loss"] == pytest.approx(h0["train_loss"], rel=1e-4)
    moved = [k for k in plain if plain[k].is_floating_point() and not torch.equal(plain[k], start.state_dict()[k])]
    assert moved  # the phase trained something
    for k in plain:
        torch.testing.assert_close(cached_sd[k], plain[k], atol=1e-4, rtol=1e-4)


def test_train_with_cache_frozen_records_the_cached_stages(folder_dataset, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="defectscope.training"):
        run = train(folder_dataset, tmp_path / "run", **{**FAST, **LITE, "train.cache_frozen": True,
                                                          "train.phases": PHASES})
    history = pd.read_csv(run / "history.csv")
    assert history["cached_blocks"].tolist() == [7, 5, 0]
    assert "photometric augmentation is off" in caplog.text


def test_cache_frozen_refuses_progressive_resize_and_skips_other_backbones(folder_dataset, tmp_path, caplog):
    with pytest.raises(ConfigError, match="progressive_resize"):
        train(folder_dataset, tmp_path / "a", **{**FAST, **LITE, "train.cache_frozen": True,
                                                 "train.progressive_resize": 0.5, "train.phases": PHASES[:1]})
    with caplog.at_level(logging.WARNING, logger="defectscope.training"):
        run = train(folder_dataset, tmp_path / "b", **{**FAST, "train.cache_frozen": True, "train.phases": PHASES[:1]})
    assert pd.read_csv(run / "history.csv")["cached_blocks"].tolist() == [0]
    assert "EfficientNet only" in caplog.text
