"""Every reader produces the same dataset table; bad rows get errors that name the file and row."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from helpers import CLASSES, make_image, write_folder_dataset
from PIL import Image

from defectscope.data.table import ELPV_CLASSES, DataError, load_table


def test_folder_reader(folder_dataset):
    table, bad = load_table(folder_dataset)
    assert bad == []
    assert list(table.columns[:4]) == ["path", "label", "split", "source"]
    assert sorted(table["label"].unique()) == sorted(CLASSES)
    assert (table["split"] == "").all()
    assert table["path"].map(lambda p: p.startswith("/")).all()


def test_folder_reader_with_split_level(tmp_path):
    for split in ("train", "val", "test"):
        write_folder_dataset(tmp_path / split, per_class=2)
    table, _ = load_table(tmp_path)
    assert set(table["split"]) == {"train", "val", "test"}
    assert set(table["label"]) == set(CLASSES)
    assert len(table) == 18


def test_die_bridge_manifest_as_is(manifest_dataset):
    table, _ = load_table(manifest_dataset, image_root=manifest_dataset.parent / "input_train")
    assert len(table) == 54
    assert {"window", "lib"} <= set(table.columns)  # metadata kept
    assert "Unnamed: 0" not in table.columns  # pandas index column dropped
    assert table["source"].iloc[0] == "Y_train.csv:2"
    assert set(table["label"]) == set(CLASSES)


def test_manifest_configurable_columns_and_split(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = ["picture;kind;part;fold"]
    rng = __import__("numpy").random.default_rng(0)
    for i, kind in enumerate(["GOOD", "spot"] * 3):
        Image.fromarray(make_image(kind, rng)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append(f"{i}.png;{kind};P{i};{'train' if i < 4 else 'Test'}")
    csv = tmp_path / "m.csv"
    csv.write_text("\n".join(rows))
    table, _ = load_table(csv, image_root=tmp_path / "imgs", path_column="picture", label_column="kind",
                          split_column="fold")
    assert list(table["split"]) == ["train"] * 4 + ["test"] * 2
    assert "part" in table.columns


def test_manifest_missing_file_names_row(manifest_dataset, tmp_path):
    csv = tmp_path / "y.csv"
    csv.write_text(manifest_dataset.read_text().replace("img_0005.png", "nope.png"))
    with pytest.raises(DataError, match=r"y\.csv:7.*nope\.png.*file not found"):
        load_table(csv, image_root=manifest_dataset.parent / "input_train")


def test_skip_bad_reports_each_row(manifest_dataset, tmp_path):
    csv = tmp_path / "y.csv"
    csv.write_text(manifest_dataset.read_text().replace("img_0005.png", "nope.png").replace(",spot\n", ",\n", 1))
    table, bad = load_table(csv, image_root=manifest_dataset.parent / "input_train", skip_bad=True)
    assert len(table) == 52
    assert {b.reason for b in bad} == {"file not found", "empty label"}


def test_unknown_label_is_an_error(folder_dataset):
    with pytest.raises(DataError, match="unknown label 'spot'"):
        load_table(folder_dataset, classes=["GOOD", "scratch"])


@pytest.mark.parametrize("text,match", [
    ("", "no rows|not a readable"),
    ("a,b\n1,2\n", "cannot tell which column"),
    ('filename,label\n"unclosed,GOOD\n', "not a readable|file not found"),
])
def test_malformed_manifests(tmp_path, text, match):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=match):
        load_table(csv)


def test_missing_source_and_wrong_kind(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_table(tmp_path / "nothing")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="expected a folder"):
        load_table(tmp_path / "x.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_table(tmp_path / "empty")


def test_hostile_paths_stay_as_given_and_missing(manifest_dataset, tmp_path):
    csv = tmp_path / "y.csv"
    csv.write_text("filename,Label\n../../../../etc/shadow_nope,GOOD\n")
    with pytest.raises(DataError, match="file not found"):
        load_table(csv)


@pytest.mark.real_data
def test_elpv_reader():
    table, _ = load_table("elpv")
    assert len(table) == 2624
    counts = table["label"].value_counts().to_dict()
    assert counts == {"functional": 1508, "possibly_defective": 295, "likely_defective": 106, "defective": 715}
    assert set(table["type"]) == {"mono", "poly"}
    assert set(table["label"]) == set(ELPV_CLASSES)


def test_table_is_a_plain_dataframe(folder_dataset, tmp_path):
    shutil.copytree(folder_dataset, tmp_path / "d")
    table, _ = load_table(tmp_path / "d")
    assert isinstance(table, pd.DataFrame)


def test_unknown_split_value_names_the_row(manifest_dataset, tmp_path):
    csv = tmp_path / "m.csv"
    lines = manifest_dataset.read_text().splitlines()
    lines[0] += ",fold"
    lines[1:] = [line + (",holdout" if i == 2 else ",train") for i, line in enumerate(lines[1:])]
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"m\.csv:4: unknown split value 'holdout'"):
        load_table(csv, image_root=manifest_dataset.parent / "input_train", split_column="fold")
