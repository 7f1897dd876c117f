"""The mistakes a newcomer makes, each refused in one line that names the file, row or field and what to do,
and none leaving a half-written run behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import FAST, make_image, write_folder_dataset
from PIL import Image

from defectscope.cli import main
from defectscope.data.checks import ClassError, check_classes
from defectscope.data.table import DataError, load_table
from defectscope.decision.calibrate import _check_good_class, review_shortfall
from defectscope.decision.policy import Policy
from defectscope.decision.thresholds import CalibrationError

TRAIN_FAST = ["--model", "seed_cnn2", "--image-size", "32", "--epochs", "1", "--no-progress"]


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("defectscope: error: "), lines
    return lines[0]


def test_a_single_class_folder_is_refused_and_leaves_no_run(tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "data", per_class=6)
    for name in ("scratch", "spot"):
        shutil.rmtree(data / name)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TRAIN_FAST]) == 2
    line = _error_line(capsys)
    assert f"{data}: only one class ('GOOD', 6 images)" in line and "add images of the other classes" in line
    assert not out.exists()


def test_a_typo_class_is_refused_naming_its_rows_and_the_class_meant(tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "data", per_class=6)
    (data / "GOD").mkdir()
    shutil.copy(data / "GOOD" / "GOOD_000.png", data / "GOD" / "odd.png")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN_FAST]) == 2
    line = _error_line(capsys)
    assert "class 'GOD' has 1 image (GOD/odd.png) - a typo of 'GOOD'?" in line
    assert "pass --min-class-images 1" in line


def test_a_typo_label_in_a_manifest_names_the_csv_line():
    table = pd.DataFrame({"label": ["GOOD"] * 6 + ["scratch"] * 6 + ["GOD"],
                          "source": [f"labels.csv:{i + 2}" for i in range(13)]})
    with pytest.raises(ClassError, match=r"class 'GOD' has 1 image \(labels\.csv:14\) - a typo of 'GOOD'\?"):
        check_classes(table, 5)
    check_classes(table, 1)  # the override accepts it


def test_min_class_images_override_trains(tmp_path):
    from defectscope import train

    data = write_folder_dataset(tmp_path / "data", per_class=8)
    (data / "rare").mkdir()
    for i in range(2):
        shutil.copy(data / "spot" / f"spot_00{i}.png", data / "rare" / f"r{i}.png")
    run = train(data, tmp_path / "run", **{**FAST, "train.epochs": 1, "data.min_class_images": 1})
    assert "rare" in json.loads((run / "model.json").read_text())["classes"]


def _manifest(root, names):
    lines = ["filename,Label"] + [f"{n},{'GOOD' if i % 2 else 'spot'}" for i, n in enumerate(names)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_images_one_folder_down_are_pointed_at(tmp_path):
    deep = tmp_path / "input_train" / "input_train"
    deep.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"img_{i}.png" for i in range(6)]
    for n in names:
        Image.fromarray(make_image("GOOD", rng)).save(deep / n)
    csv = _manifest(tmp_path, names)
    with pytest.raises(DataError, match=rf"img_0\.png is not in .*input_train but in {deep}: the images are one "
                                        rf"folder down; pass --image-root {deep}"):
        load_table(csv, image_root=tmp_path / "input_train")
    assert len(load_table(csv, image_root=deep)[0]) == 6


def test_an_image_root_that_does_not_exist_says_so_once(tmp_path, capsys):
    csv = _manifest(tmp_path, ["a.png", "b.png"])
    missing = tmp_path / "nowhere"
    assert main(["train", "--data", str(csv), "--image-root", str(missing), "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert f"labels.csv: the image folder {missing} does not exist; point --image-root at" in line


@pytest.fixture()
def run_copy(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("policy.json", "drift*"))


def test_a_good_class_without_calibration_images_is_refused_before_anything_is_written(run_copy, capsys):
    table = pd.read_csv(run_copy / "dataset.csv", dtype=str, keep_default_na=False)
    table.loc[(table["split"] == "test") & (table["label"] == "GOOD"), "label"] = "spot"
    table.to_csv(run_copy / "dataset.csv", index=False)
    before = sorted(p.name for p in run_copy.iterdir())
    assert main(["calibrate", str(run_copy), "--good-class", "GOOD"]) == 2
    assert "--good-class GOOD: no calibration images of 'GOOD'" in _error_line(capsys)
    assert sorted(p.name for p in run_copy.iterdir()) == before


def test_the_good_class_meant_is_named():
    table = pd.DataFrame({"label": ["GOOD", "GOD", "spot"]})
    calib = np.array([True, False, True])
    with pytest.raises(CalibrationError, match="did you mean --good-class GOOD"):
        _check_good_class("GOD", table, calib, ["GOD", "GOOD", "spot"])


def test_a_calibrate_that_fails_late_leaves_the_run_as_it_was(run_copy, monkeypatch, capsys):
    def fail(self, path=None):
        raise ValueError("disk full")

    monkeypatch.setattr(Policy, "to_json", fail)
    assert main(["calibrate", str(run_copy)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "defectscope: error: disk full"
    assert not list(run_copy.glob("drift*")) and not (run_copy / "policy.json").exists()
    assert not list(run_copy.glob(".calibrate-*"))


def test_nan_never_reaches_policy_json(tmp_path):
    policy = Policy(classes=["GOOD", "spot"], good_class="GOOD", temperature=1.0,
                    temperature_fit={"on": "val", "n": 0, "nll_before": float("nan"), "nll_after": float("nan")})
    text = policy.to_json(tmp_path / "policy.json")
    assert "NaN" not in text and json.loads(text)["temperature_fit"]["nll_before"] is None
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_review_rate_short_of_the_one_asked_is_said():
    said = review_shortfall({"review_rate": 0.05, "achieved_review_rate": 0.028, "n": 36})
    assert said.startswith("review rate 2.8% (1 of 36 calibration images), not the 5.0% asked")
    assert review_shortfall({"review_rate": 0.05, "achieved_review_rate": 0.049, "n": 1000}) is None
    # 5% of 6 images is under one image: the band reviews none, and says so
    assert "review rate 0.0% (0 of 6 calibration images), not the 5.0% asked" in review_shortfall(
        {"review_rate": 0.05, "achieved_review_rate": 0.0, "n": 6})


def test_train_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("default 160", "default 12", "default 32", "default 0.001", "default 5; 1 accepts any"):
        assert default in text


def _conflicting_manifest(tmp_path):
    data = write_folder_dataset(tmp_path / "data", per_class=6)
    rows = [f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    rows.append("GOOD/GOOD_000.png,scratch")  # one image, a second label (two reviewers disagreeing)
    manifest = data / "labels.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    return manifest


def test_a_file_with_two_labels_is_refused_until_told_which_wins(tmp_path, capsys):
    manifest = _conflicting_manifest(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--data", str(manifest), "--out", str(out), *TRAIN_FAST]) == 2
    line = _error_line(capsys)
    assert "1 file(s) listed with two or more labels, e.g. " in line and "GOOD_000.png as 'GOOD' and 'scratch'" in line
    assert "--label-conflicts first|last" in line
    assert "data.label_conflicts" in line and not out.exists()
    for wins, n, label in (("first", 18, "GOOD"), ("last", 18, "scratch"), ("drop", 17, None)):
        table, _ = load_table(manifest, label_conflicts=wins)
        assert len(table) == n
        rows = table[table["path"].str.endswith("GOOD_000.png")]
        assert (rows["label"].tolist() == [label]) if label else rows.empty
    assert main(["train", "--data", str(manifest), "--out", str(out), "--label-conflicts", "drop", *TRAIN_FAST]) == 0
    written = pd.read_csv(out / "dataset.csv")
    assert len(written) == 17 and not written["path"].str.endswith("GOOD_000.png").any()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--label-conflicts {refuse,first,last,drop}" in capsys.readouterr().out
