"""Training on separable synthetic classes: it learns, repeats under one seed, resumes exactly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAST, train_interrupted_after
from PIL import Image
from safetensors.torch import load_file

from defectscope import evaluate, train
from defectscope.config import ConfigError
from defectscope.data.table import DataError

quiet: dict = {}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_directory_contents(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "dataset.csv", "history.csv", "model.safetensors", "model.json", "checkpoint.pt"} <= names
    spec = json.loads((trained_run / "model.json").read_text())
    assert spec["classes"] == ["GOOD", "scratch", "spot"]
    assert spec["image_size"] == 32 and spec["in_chans"] == 1
    assert len(spec["dataset_sha256"]) == 64
    assert not list(trained_run.glob("*.pkl"))
    # the checkpoint holds only tensors and plain values: it loads with weights_only
    torch.load(trained_run / "checkpoint.pt", weights_only=True)


def test_beats_chance_on_separable_classes(trained_run):
    metrics = evaluate(trained_run, **quiet)
    assert metrics["n"] > 0
    assert metrics["accuracy"] > 0.6  # chance is 1/3
    saved = json.loads((trained_run / "evaluation" / "metrics.json").read_text())
    assert saved["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert (trained_run / "evaluation" / "predictions.csv").is_file()


@pytest.mark.slow
def test_same_seed_same_weights(folder_dataset, tmp_path):
    a = train(folder_dataset, tmp_path / "a", **quiet, **{**FAST, "train.epochs": 2})
    b = train(folder_dataset, tmp_path / "b", **quiet, **{**FAST, "train.epochs": 2})
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "dataset.csv").read_text() == (b / "dataset.csv").read_text()
    c = train(folder_dataset, tmp_path / "c", **quiet, **{**FAST, "train.epochs": 2, "seed": 1})
    assert not all(torch.equal(wa[k], _weights(c)[k]) for k in wa)


@pytest.mark.slow
def test_resume_continues_to_the_same_result(folder_dataset, tmp_path):
    recipe = {**FAST, "train.epochs": 4}
    full = train(folder_dataset, tmp_path / "full", **quiet, **recipe)
    train_interrupted_after(2, folder_dataset, tmp_path / "part", **recipe)
    assert not (tmp_path / "part" / "model.json").exists()
    resumed = train(out=tmp_path / "part", resume=True, **quiet)
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert (full / "history.csv").read_text() .count("\n") == (resumed / "history.csv").read_text().count("\n")


def test_refuses_to_overwrite_a_run(trained_run, folder_dataset):
    with pytest.raises(FileExistsError):
        train(folder_dataset, trained_run, **quiet, **FAST)


@pytest.mark.parametrize("options", [
    {"train.loss": "focal"},
    {"train.sampling": "balanced"},
    {"train.sampling": "undersample", "train.undersample_ratio": 1.0},
    {"augment.hflip": True, "augment.vflip": True, "augment.rot90": True},
    {"train.monitor": "val_loss", "train.optimizer": "adam", "train.patience": 1},
    {"train.phases": [{"unfreeze": "head", "epochs": 1, "lr": 3e-3},
                      {"unfreeze": "last:2", "epochs": 1, "lr": 1e-3},
                      {"unfreeze": "all", "epochs": 1, "lr": 5e-4}]},
])
def test_training_options_run(folder_dataset, tmp_path, options):
    run = train(folder_dataset, tmp_path / "r", **quiet, **{**FAST, "train.epochs": 2, **options})
    history = (run / "history.csv").read_text()
    assert "val_macro_f1" in history


def test_head_phase_trains_only_the_head(folder_dataset, tmp_path):
    from defectscope.models.factory import create_model
    from defectscope.training.loop import set_trainable

    model = create_model("seed_cnn3", 3, image_size=32)
    trainable = set_trainable(model, "head")
    assert {id(p) for p in trainable} == {id(p) for p in model.head.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = train(folder_dataset, tmp_path / "r", **quiet,
                **{**FAST, "model.name": "seed_cnn3", "train.phases": [{"unfreeze": "head", "epochs": 2}]})
    after = _weights(run)
    # the backbone was re-initialised by the same seed; only the head may differ from a fresh model
    torch.manual_seed(0)
    fresh = create_model("seed_cnn3", 3, image_size=32).state_dict()
    for k in fresh:
        if k.startswith("backbone."):
            assert torch.equal(fresh[k], after[k]), k
    assert not torch.equal(fresh["head.weight"], after["head.weight"])
    del before


def test_bad_image_stops_with_its_name_or_is_skipped(folder_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder_dataset, data)
    (data / "spot" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (data / "GOOD" / "empty.png").write_bytes(b"")
    before = _tree_digest(data)
    with pytest.raises(DataError, match=r"(broken|empty)\.png"):
        train(data, tmp_path / "r1", **quiet, **FAST)
    run = train(data, tmp_path / "r2", **quiet, **{**FAST, "data.skip_bad": True, "train.epochs": 1})
    skipped = (run / "skipped.csv").read_text()
    assert "broken.png" in skipped and "empty.png" in skipped
    assert "broken.png" not in (run / "dataset.csv").read_text()
    assert _tree_digest(data) == before  # nothing on disk changed


def test_sixteen_bit_and_rgba_images_train(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    for cls, level in (("GOOD", 10000), ("dark", 60000)):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(8):
            arr = (rng.normal(level, 2000, (24, 30))).clip(0, 65535).astype(np.uint16)
            Image.fromarray(arr).save(tmp_path / "d" / cls / f"{i}.png")
            rgba = np.dstack([np.full((20, 20, 3), level // 257, np.uint8), np.full((20, 20), 7, np.uint8)])
            Image.fromarray(rgba, "RGBA").save(tmp_path / "d" / cls / f"rgba{i}.png")
    run = train(tmp_path / "d", tmp_path / "r", **quiet, **{**FAST, "train.epochs": 1})
    assert (run / "model.safetensors").is_file()


def test_config_errors_are_clear(folder_dataset, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        train(folder_dataset, tmp_path / "r", **quiet, **{"train.epoch": 3})
    bad = tmp_path / "c.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        train(folder_dataset, tmp_path / "r", config_file=bad, **quiet)
    with pytest.raises(ConfigError, match="expected a number"):
        train(folder_dataset, tmp_path / "r", **quiet, **{"train.epochs": "many"})


def test_numbers_follow_the_declared_type_not_the_current_value():
    from defectscope.config import apply_overrides, build_config

    cfg = build_config(overrides={"train.time_limit_minutes": 10})
    # a float field that once held a whole number keeps the fraction of a later value (7.5 was cut to 7)
    assert apply_overrides(cfg, {"train.time_limit_minutes": 7.5}).train.time_limit_minutes == 7.5
    assert apply_overrides(cfg, {"train.epochs": "12"}).train.epochs == 12
    with pytest.raises(ConfigError, match="train.epochs: expected a whole number, got '7.5'"):
        apply_overrides(cfg, {"train.epochs": "7.5"})


def test_time_limit_stops_between_epochs(folder_dataset, tmp_path):
    import pandas as pd

    run = train(folder_dataset, tmp_path / "r", **quiet, **{**FAST, "train.epochs": 50,
                                                            "train.time_limit_minutes": 0.0001})
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 and bool(history["time_limit"].iloc[-1])
    assert (run / "model.safetensors").is_file()


def test_class_weight_power():
    from defectscope.training.losses import inverse_frequency_weights

    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 0 + [3] * 20)
    full = inverse_frequency_weights(labels, 4)
    assert torch.allclose(full, torch.tensor([60 / 90, 60 / 30, 0.0, 60 / 60]))
    assert torch.allclose(inverse_frequency_weights(labels, 4, 0.5), full.sqrt())
    assert torch.equal(inverse_frequency_weights(labels, 4, 0.0)[[0, 1, 3]], torch.ones(3))


def test_auto_fine_tune_has_the_plain_fine_tunes_config_but_its_time_limit():
    from defectscope.config import build_config
    from defectscope.training.train import auto_finetune_config

    cfg = build_config(preset="wafer", overrides={"train.recipe": "auto", "train.time_limit_minutes": 10})
    tuned = auto_finetune_config(cfg, 7.5).to_dict()
    plain = cfg.to_dict()
    assert tuned["train"].pop("recipe") == "finetune" and plain["train"].pop("recipe") == "auto"
    assert tuned["train"].pop("time_limit_minutes") == 7.5 and plain["train"].pop("time_limit_minutes") == 10
    assert tuned == plain  # the wafer preset's image size, augmentation, epochs and patience are all kept
    assert tuned["model"]["image_size"] == 64


@pytest.mark.slow
def test_auto_fine_tunes_exactly_as_the_plain_fine_tune(folder_dataset, tmp_path):
    recipe = {**FAST, "train.epochs": 3, "train.frozen_c": [1.0]}
    plain = train(folder_dataset, tmp_path / "plain", **quiet, **recipe)
    auto = train(folder_dataset, tmp_path / "auto", **quiet, **recipe, **{"train.recipe": "auto"})
    epochs = json.loads((auto / "model.json").read_text())["auto"]["finetune_epochs"]
    history = (plain / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    plain_f1 = [float(row.split(",")[header.index("val_macro_f1")]) for row in history[1:]]
    # same initial weights, batches and dropout as the plain run: the same validation score epoch by epoch
    assert [e["val_macro_f1"] for e in epochs] == plain_f1 and len(plain_f1) == 3


def _wait_policy_in_a_fresh_process(load: float, env: dict[str, str]) -> str:
    """(returned policy, OMP_WAIT_POLICY after) of wait_passively_if_busy in a process without torch loaded."""
    import os
    import subprocess
    import sys

    code = (f"import os, sys; os.getloadavg = lambda: ({load!r}, 0.0, 0.0)\n"
            "from defectscope.training.train import wait_passively_if_busy\n"
            "assert 'torch' not in sys.modules\n"
            "print(wait_passively_if_busy(), os.environ.get('OMP_WAIT_POLICY'))")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_training_threads_sleep_instead_of_spinning_only_on_a_busy_machine():
    assert _wait_policy_in_a_fresh_process(6.0, {}) == "PASSIVE PASSIVE"
    assert _wait_policy_in_a_fresh_process(0.2, {}) == "None None"  # idle: spinning is the faster
    # the user's own choice wins
    assert _wait_policy_in_a_fresh_process(6.0, {"OMP_WAIT_POLICY": "ACTIVE"}) == "None ACTIVE"
    assert _wait_policy_in_a_fresh_process(6.0, {"GOMP_SPINCOUNT": "300000"}) == "None None"
