"""Wafer maps: WM-811K pickle, G85 XML, .npy/.npz die grids, rendering, and the synthetic generator."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from defectscope.data import wm811k
from defectscope.data.images import ImageDecodeError, decode_gray, load_gray
from defectscope.data.table import DataError, load_table
from defectscope.data.wafer import WaferMapError, parse_g85, read_die_grid, write_g85
from defectscope.data.wafer_synth import PATTERNS, generate_dataset, generate_map, wafer_geometry

GRID = np.array([
    [0, 0, 1, 1, 0, 0],
    [0, 1, 2, 1, 1, 0],
    [1, 1, 2, 2, 1, 1],
    [1, 1, 1, 2, 1, 1],
    [0, 1, 1, 1, 1, 0],
    [0, 0, 1, 1, 0, 0],
], dtype=np.uint8)


def _grid(seed: int, shape=(26, 27)) -> np.ndarray:
    inside, _, _ = wafer_geometry(max(shape))
    g = np.where(inside, np.random.default_rng(seed).integers(1, 3, size=inside.shape), 0).astype(np.uint8)
    return g[: shape[0], : shape[1]]


def write_lswmd(path, *, legacy_modules: bool = True) -> pd.DataFrame:
    """A small LSWMD.pkl in the published layout: object columns holding numpy arrays, protocol 2,
    labels as (1, 1) arrays or (0, 0) when unlabelled, the trianTestLabel typo, and (optionally) the
    2017 module path pandas.indexes that a current pandas no longer has."""
    frame = pd.DataFrame({
        "waferMap": [_grid(0), _grid(1, (30, 30)), _grid(2), np.array([1, 2, 1], dtype=np.uint8),
                     np.zeros((0, 0), dtype=np.uint8), _grid(3)],
        "dieSize": [1683.0, 1683.0, 710.0, 710.0, 710.0, 1683.0],
        "lotName": ["lot1", "lot1", "lot2", "lot2", "lot2", "lot3"],
        "waferIndex": [1.0, 2.0, 1.0, 2.0, 3.0, 7.0],
        "trianTestLabel": [np.array([["Training"]]), np.array([["Test"]]), np.zeros((0, 0)),
                           np.array([["Training"]]), np.zeros((0, 0)), np.array([["Training"]])],
        "failureType": [np.array([["Edge-Ring"]]), np.array([["none"]]), np.zeros((0, 0)),
                        np.array([["Center"]]), np.zeros((0, 0)), np.array([["Center"]])],
    })
    frame.index = [0, 1, 2, 3, 4, 811456]
    data = pickle.dumps(frame, protocol=2)
    if legacy_modules:
        assert b"pandas.core.indexes" in data  # protocol 2 names modules as text lines, so the swap is safe
        data = data.replace(b"pandas.core.indexes", b"pandas.indexes")
    path.write_bytes(data)
    return frame


@pytest.fixture
def lswmd(tmp_path):
    path = tmp_path / "LSWMD.pkl"
    write_lswmd(path)
    return path


def test_fixture_needs_the_module_remap(lswmd):
    with pytest.raises(ModuleNotFoundError, match="pandas.indexes"):
        pickle.loads(lswmd.read_bytes())
    frame = wm811k.read_lswmd(lswmd, trust_pickle=True)
    assert list(frame.index) == [0, 1, 2, 3, 4, 811456]
    assert frame["failureType"].iloc[0].shape == (1, 1)


def test_pickle_refused_without_trust(lswmd, tmp_path):
    for call in (lambda: wm811k.read_lswmd(lswmd), lambda: wm811k.convert_lswmd(lswmd, tmp_path / "out")):
        with pytest.raises(wm811k.PickleTrustError, match="--trust-pickle") as info:
            call()
        assert "defectscope wafer convert" in str(info.value)
    with pytest.raises(DataError, match="arbitrary code"):
        load_table(lswmd, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_convert_keeps_unlabelled_pool_and_names_bad_rows(lswmd, tmp_path):
    conv = wm811k.convert_lswmd(lswmd, tmp_path / "maps", trust_pickle=True)
    assert (conv.labelled, conv.unlabelled) == (3, 1)
    assert [s for s, _ in conv.skipped] == ["LSWMD.pkl:3", "LSWMD.pkl:4"]  # 1-D map, and the empty one
    manifest = pd.read_csv(conv.manifest, dtype=str, keep_default_na=False)
    assert list(manifest["label"]) == ["Edge-Ring", "none", "Center"]
    assert list(manifest["trianTestLabel"]) == ["Training", "Test", "Training"]
    assert list(manifest["source"]) == ["LSWMD.pkl:0", "LSWMD.pkl:1", "LSWMD.pkl:811456"]
    pool = pd.read_csv(tmp_path / "maps" / wm811k.UNLABELLED, dtype=str, keep_default_na=False)
    assert list(pool["source"]) == ["LSWMD.pkl:2"] and list(pool["split"]) == ["unlabelled"]
    # The converted maps read back bit-exactly, without any pickle.
    np.testing.assert_array_equal(read_die_grid(tmp_path / "maps" / manifest["path"][0]), _grid(0))
    table, bad = load_table(conv.manifest)
    assert len(table) == 3 and not bad


def test_load_table_reads_the_pickle_with_trust(lswmd, tmp_path):
    with pytest.raises(DataError, match=r"LSWMD.pkl:3: a die grid must be 2-D.*--skip-bad"):
        load_table(lswmd, trust_pickle=True, cache_dir=tmp_path / "c")
    table, bad = load_table(lswmd, trust_pickle=True, skip_bad=True, cache_dir=tmp_path / "c",
                            split_column="trianTestLabel")
    assert sorted(table["label"]) == ["Center", "Edge-Ring", "none"]
    assert list(table["split"]) == ["train", "test", "train"]
    assert {b.source for b in bad} == {"LSWMD.pkl:3", "LSWMD.pkl:4"}
    assert table["lotName"].tolist() == ["lot1", "lot1", "lot3"]
    img = load_gray(table["path"][0], 64)
    assert set(np.unique(img)) == {0, 128, 255}


def test_npy_npz_decode_and_nearest_rendering(tmp_path):
    np.save(tmp_path / "a.npy", GRID)
    np.savez_compressed(tmp_path / "b.npz", die_states=GRID)
    for name in ("a.npy", "b.npz"):
        np.testing.assert_array_equal(decode_gray(tmp_path / name), np.array([0, 128, 255])[GRID])
        big = load_gray(tmp_path / name, 60)  # 10x nearest: every die a 10x10 block, no blend between dies
        np.testing.assert_array_equal(big, np.kron(np.array([0, 128, 255], np.uint8)[GRID], np.ones((10, 10))))
    np.testing.assert_array_equal(load_gray(GRID, 60, input_kind="wafer_map"), load_gray(tmp_path / "a.npy", 60))
    small = load_gray(tmp_path / "a.npy", 4)
    assert set(np.unique(small)) <= {0, 128, 255}


@pytest.mark.parametrize("content, reason", [
    (np.array([[0, 3]]), "die states must be 0"),
    (np.zeros((2, 2, 2), np.uint8), "must be 2-D"),
    (np.array([["a"]], dtype=object), "not a plain numpy array"),
])
def test_bad_npy_named(tmp_path, content, reason):
    path = tmp_path / "bad.npy"
    np.save(path, content, allow_pickle=True)
    with pytest.raises(ImageDecodeError, match=reason) as info:
        load_gray(path, 32)
    assert info.value.path == str(path)


G85_HEX = """<?xml version="1.0" encoding="UTF-8"?>
<Maps xmlns="http://www.semi.org">
 <Map SubstrateType="Wafer" SubstrateId="W07" FormatRevision="SEMI G85-0703">
  <Device ProductId="P9" LotId="L42" Orientation="90" Rows="3" Columns="4" BinCodeType="HexaDecimal" NullBin="FF">
   <ReferenceDevice ReferenceDeviceX="1" ReferenceDeviceY="1"/>
   <Bin BinCode="01" BinCount="5" BinQuality="Pass" BinDescription="good"/>
   <Bin BinCode="0A" BinCount="2" BinQuality="Fail"/>
   <Bin BinCode="0B" BinCount="1" BinQuality="Fail"/>
   <Data MapName="m" MapVersion="2">
    <Row><![CDATA[FF 01 01 FF]]></Row>
    <Row><![CDATA[010A0B01]]></Row>
    <Row><![CDATA[FF 01 0A FF]]></Row>
   </Data>
  </Device>
 </Map>
</Maps>"""


def test_g85_by_hand():
    m = parse_g85(G85_HEX)
    np.testing.assert_array_equal(m.states, [[0, 1, 1, 0], [1, 2, 2, 1], [0, 1, 2, 0]])
    assert m.attributes["LotId"] == "L42" and m.attributes["SubstrateId"] == "W07"
    np.testing.assert_array_equal(parse_g85(write_g85(GRID)).states, GRID)


@pytest.mark.parametrize("xml, reason", [
    ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><Maps>&lol2;</Maps>',
     "DOCTYPE or ENTITY"),
    ("<Maps><Map><Device>", "not well-formed"),
    ("<Maps/>", "no <Map>"),
    (G85_HEX.replace('Rows="3"', 'Rows="4"'), 'Rows="4"'),
    (G85_HEX.replace("010A0B01", "010A0B"), "row 1 has 4"),
])
def test_hostile_or_broken_g85(tmp_path, xml, reason):
    with pytest.raises(WaferMapError, match=reason):
        parse_g85(xml)
    path = tmp_path / "m.xml"
    path.write_text(xml)
    with pytest.raises(ImageDecodeError, match=reason):
        decode_gray(path)


def test_g85_folder_per_class(tmp_path):
    for cls, seed in (("Center", 0), ("Center", 1), ("none", 2)):
        (tmp_path / cls).mkdir(exist_ok=True)
        (tmp_path / cls / f"w{seed}.xml").write_text(write_g85(_grid(seed)))
    table, _ = load_table(tmp_path)
    assert sorted(table["label"]) == ["Center", "Center", "none"]
    assert load_gray(table["path"][0], 32).shape == (32, 32)


# --- generator: each pattern has its defining property ------------------------------------------------------

def _fails(pattern, seed, size=48):
    states, params = generate_map(pattern, np.random.default_rng(seed), size=size, noise=0.0)
    inside, r, theta = wafer_geometry(size)
    fail = states == 2
    return states, fail, r, theta, inside, params


@pytest.mark.parametrize("seed", range(5))
def test_generator_patterns_have_their_shape(seed):
    _, f, r, _, inside, _ = _fails("Center", seed)
    assert f.any() and r[f].max() < 0.5
    _, f, r, _, _, p = _fails("Donut", seed)
    assert r[f].min() >= p["inner"] - 0.05 and (r[f] < 0.25).sum() == 0
    _, f, r, _, _, _ = _fails("Edge-Ring", seed)
    assert r[f].min() > 0.75
    ring = r > 0.85
    _, f, r, theta, _, _ = _fails("Edge-Ring", seed)
    assert np.histogram(theta[f & ring], bins=8, range=(-np.pi, np.pi))[0].min() > 0  # all round the wafer
    _, f, r, theta, _, _ = _fails("Edge-Loc", seed)
    assert r[f].min() > 0.55 and np.histogram(theta[f], bins=8, range=(-np.pi, np.pi))[0].tolist().count(0) >= 3
    _, f, r, _, _, _ = _fails("Loc", seed)
    assert 0 < f.sum() < 0.15 * inside.sum() and r[f].max() < 0.9
    _, f, _, _, inside, _ = _fails("Near-full", seed)
    assert f.sum() > 0.75 * inside.sum()
    _, f, r, _, inside, _ = _fails("Random", seed)
    share = f.sum() / inside.sum()
    assert 0.1 < share < 0.45
    assert abs(f[inside & (r < 0.6)].mean() - f[inside & (r >= 0.6)].mean()) < 0.12  # no radial structure
    _, f, _, _, _, _ = _fails("Scratch", seed)
    yx = np.argwhere(f).astype(float)
    eig = np.linalg.eigvalsh(np.cov(yx.T))
    assert eig[1] > 20 * max(eig[0], 1e-3)  # a line: one long axis, almost no width
    _, f, _, _, _, _ = _fails("none", seed)
    assert not f.any()


def test_generator_noise_and_seed(tmp_path):
    states, _ = generate_map("none", np.random.default_rng(0), size=64, noise=0.05)
    inside, _, _ = wafer_geometry(64)
    assert 0.03 < (states == 2).sum() / inside.sum() < 0.07
    assert (states[~inside] == 0).all()
    a = generate_dataset(tmp_path / "a", per_class=2, seed=3)
    b = generate_dataset(tmp_path / "b", per_class=2, seed=3)
    assert a.read_text() == b.read_text()
    table, _ = load_table(a)
    assert sorted(table["label"].unique()) == sorted(PATTERNS) and len(table) == 18
    assert "SYNTHETIC" in (tmp_path / "a" / "README.txt").read_text()


# --- end to end: synthetic maps -> train -> export -> predict raw die grids -------------------------------------

@pytest.mark.slow
def test_wafer_train_export_predict(tmp_path):
    from defectscope.cli import main
    from defectscope.runtime.predictor import Predictor

    manifest = generate_dataset(tmp_path / "syn", per_class=10, seed=0, patterns=("Center", "Edge-Ring", "none"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(manifest), "--out", str(run), "--model", "seed_cnn2", "--image-size", "32",
                 "--epochs", "2", "--batch-size", "16", "--no-progress", "--set", "train.patience=0"]) == 0
    spec = __import__("json").loads((run / "model.json").read_text())
    assert spec["input_kind"] == "wafer_map" and spec["resize"] == "nearest"
    cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())
    assert cfg["augment"]["rot90"] and not cfg["augment"]["photometric"]  # the wafer preset was applied
    assert main(["export", str(run), "--out", str(run / "export" / "model.onnx")]) == 0
    p = Predictor(run / "export" / "model.onnx")
    states, _ = generate_map("Edge-Ring", np.random.default_rng(5), size=33)
    (tmp_path / "w.xml").write_text(write_g85(states))
    np.save(tmp_path / "w.npy", states)
    by_array, by_npy, by_xml = p.predict(states), p.predict(tmp_path / "w.npy"), p.predict(tmp_path / "w.xml")
    assert by_array.probabilities == pytest.approx(by_npy.probabilities)
    assert by_xml.probabilities == pytest.approx(by_npy.probabilities)


def test_wafer_cli_convert_refuses_then_converts(lswmd, tmp_path, capsys):
    from defectscope.cli import main

    assert main(["wafer", "convert", str(lswmd), "--out", str(tmp_path / "m")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["wafer", "convert", str(lswmd), "--out", str(tmp_path / "m"), "--trust-pickle"]) == 0
    assert (tmp_path / "m" / "manifest.csv").is_file() and (tmp_path / "m" / "unlabelled.csv").is_file()


def test_wafer_decoding_needs_neither_torch_nor_pandas():
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    code = ("import sys; sys.modules['torch'] = None; sys.modules['pandas'] = None; "
            "import numpy as np, defectscope.data.images as im; "
            "print(im.load_gray(np.eye(5, dtype=np.uint8) * 2, 10, input_kind='wafer_map').max())")
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "255", result.stderr


def test_npz_bomb_refused_before_unpacking(tmp_path):
    np.savez_compressed(tmp_path / "big.npz", die_states=np.ones((3000, 3000), np.uint8))
    with pytest.raises(ImageDecodeError, match="zip bomb"):
        decode_gray(tmp_path / "big.npz", max_pixels=10_000)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_gray(np.save(tmp_path / "big.npy", np.ones((300, 300), np.uint8)) or tmp_path / "big.npy",
                    max_pixels=10_000)


@pytest.mark.slow
def test_train_on_lswmd_pickle_from_the_cli(tmp_path, capsys):
    from defectscope.cli import main

    rng = np.random.default_rng(0)
    maps, labels = [], []
    for pattern in ("Center", "Edge-Ring", "none"):
        for _ in range(8):
            maps.append(generate_map(pattern, rng, size=int(rng.integers(24, 32)))[0])
            labels.append(np.array([[pattern]]))
    maps.append(np.zeros((0, 0), np.uint8))  # a map WM-811K-style broken: skipped with --skip-bad
    labels.append(np.array([["none"]]))
    frame = pd.DataFrame({"waferMap": maps, "failureType": labels, "lotName": [f"lot{i % 5}" for i in range(25)],
                          "trianTestLabel": [np.zeros((0, 0))] * 25})
    pkl = tmp_path / "LSWMD.pkl"
    pkl.write_bytes(pickle.dumps(frame, protocol=2).replace(b"pandas.core.indexes", b"pandas.indexes"))
    args = ["train", "--data", str(pkl), "--out", str(tmp_path / "run"), "--model", "seed_cnn2", "--image-size", "32",
            "--epochs", "1", "--no-progress", "--skip-bad"]
    assert main(args) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "run" / "model.json").exists()
    assert main([*args, "--trust-pickle"]) == 0
    table = pd.read_csv(tmp_path / "run" / "dataset.csv", dtype=str, keep_default_na=False)
    assert len(table) == 24 and table["path"].str.endswith(".npz").all()
    assert "LSWMD.pkl:24" in (tmp_path / "run" / "skipped.csv").read_text()


KLARF = """FileVersion 1 2;
FileTimestamp 11-24-26 10:08:09;
InspectionStationID "KLA" "2367" "TOOL-1";
SampleType WAFER;
LotID "LOT;7";
DeviceID "DEV1";
DiePitch 1.0e+04 1.0e+04;
WaferID "W07";
Slot 7;
SampleTestPlan 7
 0 1
 -1 0
 0 0
 1 0
 -1 -1
 0 -1
 1 -1;
DefectRecordSpec 6 DEFECTID XREL YREL XINDEX YINDEX CLASSNUMBER;
DefectList
 1 120.5 300.0 0 0 1
 2 10.0 20.0 0 0 3
 3 55.0 66.0 1 -1 1;
SummarySpec 2 TESTNO NDEFECT;
SummaryList
 1 3;
EndOfFile;
"""


def test_klarf_by_hand(tmp_path):
    from defectscope.data.wafer import parse_klarf

    np.testing.assert_array_equal(parse_klarf(KLARF), [[0, 1, 0], [1, 2, 1], [1, 1, 2]])
    (tmp_path / "w.klarf").write_text(KLARF)
    assert set(np.unique(load_gray(tmp_path / "w.klarf", 9))) == {0, 128, 255}
    for bad, reason in ((KLARF.replace("SampleTestPlan 7", "SampleTestPlan 8"), "declares 8 dies"),
                        (KLARF.replace('WaferID "W07";', 'WaferID "W07"; WaferID "W08";'), "2 wafers"),
                        ("Record FileRecord \"1.8\" { }", "KLARF 1.8"),
                        (KLARF.replace(" 3 55.0 66.0 1 -1 1;", " 3 55.0 66.0 1;"), "not a multiple")):
        (tmp_path / "bad.klarf").write_text(bad)
        with pytest.raises(ImageDecodeError, match=reason):
            decode_gray(tmp_path / "bad.klarf")
