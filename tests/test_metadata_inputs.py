"""Metadata inputs (``model.metadata_inputs``): encoding, training with and without, ONNX round trip, and the
predictor, batch predict, sorter and service requiring the values.

The fixture's classes depend on the image *and* a metadata column: a plain image is GOOD, a spot is ``spot_A``
or ``spot_B`` according to ``lib`` alone, so an image-only model cannot beat chance between the two spot classes.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import FAST, make_image
from PIL import Image

from defectscope.data.metadata_inputs import MetadataEncoder, MetadataInputError

TRAIN = {**FAST, "model.pretrained": "none", "train.epochs": 8}


# ------------------------------------------------------------------------------------------------ encoder

def _table(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"path": [f"{i}.png" for i in range(n)], "label": ["x"] * n, "split": ["train"] * n,
                         "source": [f"labels.csv:{i + 2}" for i in range(n)], **columns})


def test_encoder_one_hot_standardise_and_spec_round_trip():
    temps = [str(20 + i) for i in range(25)]  # > 20 distinct numbers: numeric
    table = _table(lib=["Die02", "Die01"] * 12 + ["Die03"], window=["2003", "2005"] * 12 + ["2003"], temp=temps)
    enc = MetadataEncoder.fit(table, ["lib", "window", "temp"])
    assert [(f.name, f.kind) for f in enc.fields] == [("lib", "categorical"), ("window", "categorical"),
                                                     ("temp", "numeric")]
    assert enc.dim == 3 + 2 + 1
    v = enc.encode({"lib": "Die03", "window": 2005, "temp": "32", "ignored": "x"})
    np.testing.assert_allclose(v[:5], [0, 0, 1, 0, 1])
    assert v[5] == pytest.approx((32 - 32) / np.std(np.arange(20, 45)))
    again = MetadataEncoder.from_spec(enc.to_spec())
    np.testing.assert_array_equal(again.encode_table(table), enc.encode_table(table))
    forced = MetadataEncoder.fit(table, ["window:numeric", "temp:categorical"])
    assert [f.kind for f in forced.fields] == ["numeric", "categorical"] and forced.dim == 1 + 25
    # Numeric statistics come from the training rows only.
    train = np.arange(25) < 10
    assert MetadataEncoder.fit(table, ["temp"], train_rows=train).fields[0].mean == pytest.approx(24.5)


def test_encoder_refusals_name_the_field():
    table = _table(lib=["A", "B", "A"], temp=["1", "2", "x"])
    enc = MetadataEncoder.fit(table, ["lib"])
    with pytest.raises(MetadataInputError, match=r"'lib' is missing or empty.*one of A, B"):
        enc.encode({})
    with pytest.raises(MetadataInputError, match=r"'lib': unknown value 'C'; the model knows 'A', 'B'"):
        enc.encode({"lib": "C"})
    with pytest.raises(MetadataInputError, match="not a column.*lib, temp"):
        MetadataEncoder.fit(table, ["tool"])
    with pytest.raises(MetadataInputError, match="non-numbers such as 'x'"):
        MetadataEncoder.fit(table, ["temp:numeric"])
    with pytest.raises(MetadataInputError, match=r"empty in 1 row\(s\) \(labels.csv:4\)"):
        MetadataEncoder.fit(_table(lib=["A", "B", ""]), ["lib"])
    with pytest.raises(MetadataInputError, match="which the table lacks"):
        enc.encode_table(table.drop(columns="lib"))


# ------------------------------------------------------------------------------------------- trained runs

def _write_dataset(root: Path, good: int = 60, spots: int = 120) -> Path:
    images = root / "img"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [("filename", "lib", "label")]
    for i in range(good + spots):
        kind = "GOOD" if i < good else "spot"
        lib = "A" if i % 2 else "B"
        name = f"{lib}_{i:04d}.png"
        Image.fromarray(make_image(kind, rng)).save(images / name)
        rows.append((f"img/{name}", lib, "GOOD" if kind == "GOOD" else f"spot_{lib}"))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def meta_data(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("meta_data"))


@pytest.fixture(scope="module")
def meta_runs(meta_data, tmp_path_factory) -> dict[str, Path]:
    """Fine-tuned with and without ``lib``, and the frozen recipe (linear and RBF head) with it."""
    from defectscope import train

    root = tmp_path_factory.mktemp("meta_runs")
    with_lib = {"model.metadata_inputs": ["lib"]}
    return {
        "with": train(meta_data, root / "with", **TRAIN, **with_lib),
        "without": train(meta_data, root / "without", **TRAIN),
        "frozen_rbf": train(meta_data, root / "frozen_rbf", **TRAIN, **with_lib, **{"train.recipe": "frozen"}),
        "frozen_linear": train(meta_data, root / "frozen_linear", **TRAIN, **with_lib,
                               **{"train.recipe": "frozen", "train.frozen_head": "linear"}),
        "frozen_without": train(meta_data, root / "frozen_without", **TRAIN, **{"train.recipe": "frozen"}),
    }


def _test_accuracy(run_dir: Path) -> float:
    from defectscope.evaluation.evaluate import evaluate

    return evaluate(run_dir, report=False)["accuracy"]


def test_metadata_helps_where_the_image_cannot_tell(meta_runs):
    import json

    spec = json.loads((meta_runs["with"] / "model.json").read_text())
    assert spec["metadata_inputs"] == [{"name": "lib", "kind": "categorical", "categories": ["A", "B"]}]
    acc = {name: _test_accuracy(path) for name, path in meta_runs.items()}
    # Image only: GOOD is easy, the two spot classes are a coin flip (at most ~2/3 overall).
    assert acc["without"] < 0.85 and acc["frozen_without"] < 0.85, acc
    # With lib the spot classes separate; what remains is GOOD vs spot, which the linear head on a random
    # (untrained) backbone's features gets less right than the kernel head or the fine-tune.
    for name in ("with", "frozen_rbf", "frozen_linear"):
        assert acc[name] >= (0.8 if name == "frozen_linear" else 0.9), acc
        assert acc[name] > acc["without" if name == "with" else "frozen_without"] + 0.15, acc


def test_run_without_metadata_values_is_refused(meta_runs):
    from defectscope.models.inference import predict_logits
    from defectscope.rundir import Run

    run = Run(meta_runs["with"])
    rows, images = run.images(run.rows("test"))
    with pytest.raises(ValueError, match="takes 2 metadata values"):
        predict_logits(run.model(), images)
    assert predict_logits(run.model(), images, metadata=run.metadata(rows)).shape == (len(rows), 3)


@pytest.fixture(scope="module")
def meta_models(meta_runs, tmp_path_factory) -> dict[str, Path]:
    """The fine-tuned run calibrated (a policy) and exported, and the frozen RBF run exported."""
    from defectscope.decision.calibrate import calibrate
    from defectscope.onnx_export.exporter import export

    root = tmp_path_factory.mktemp("meta_models")
    out = {}
    for name in ("with", "frozen_rbf"):
        run = shutil.copytree(meta_runs[name], root / name)
        if name == "with":
            calibrate(run, review_rate=0.1, drift_rate=None)
        out[name] = root / f"{name}.onnx"
        report = export(run, out[name], select=False)
        assert report["parity"]["max_abs_diff_probabilities"] <= 1e-4
        assert report["reference_set"] is None and "int8" not in report
    return out


def test_exported_graph_takes_metadata_and_matches_torch(meta_runs, meta_models):
    import onnxruntime as ort
    import torch

    from defectscope.rundir import Run
    from defectscope.runtime.predictor import Predictor

    for name, model_path in meta_models.items():
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in session.get_inputs()}
        assert set(inputs) == {"image", "metadata"} and inputs["metadata"][1] == 2
        run = Run(meta_runs[name])
        rows, images = run.images(run.rows("test"))
        meta = run.metadata(rows)
        with torch.no_grad():
            x = torch.from_numpy(images).float().div(255).unsqueeze(1)
            expected = torch.softmax(run.model()(x, torch.from_numpy(meta)), 1).numpy()
        predictor = Predictor(model_path, runtime="auto", precision="auto")  # auto: ORT fp32 for such models
        assert (predictor.runtime, predictor.precision) == ("onnxruntime", "fp32")
        assert predictor.metadata_fields == ["lib"]
        preds = predictor.predict_batch(rows["path"].tolist(), metadata=rows[["lib"]].to_dict("records"))
        got = np.array([[p.probabilities[c] for c in predictor.classes] for p in preds])
        assert np.abs(got - expected).max() <= 1e-4
        one = predictor.predict(rows["path"].iloc[0], metadata={"lib": rows["lib"].iloc[0]})
        assert one.probabilities == pytest.approx(preds[0].probabilities, abs=1e-6)


def test_predictor_requires_the_values(meta_models):
    from defectscope.runtime.predictor import UNREADABLE, MetadataInputError, Predictor

    predictor = Predictor(meta_models["with"])
    image = make_image("spot", np.random.default_rng(3))
    a = predictor.predict(image, metadata={"lib": "A"})
    b = predictor.predict(image, metadata={"lib": "B"})
    assert (a.top_class, b.top_class) == ("spot_A", "spot_B")  # same pixels, the metadata decides
    with pytest.raises(MetadataInputError, match="'lib' is missing"):
        predictor.predict(image)
    with pytest.raises(MetadataInputError, match="unknown value 'C'; the model knows 'A', 'B'"):
        predictor.predict(image, metadata={"lib": "C"})
    with pytest.raises(MetadataInputError, match="needs metadata with every image: lib"):
        predictor.infer_arrays(np.zeros((1, 1, 32, 32), np.float32))
    rows = predictor.predict_batch([image, image], metadata=[{"lib": "A"}, {}])
    assert rows[0].top_class == "spot_A"
    assert rows[1].decision == UNREADABLE and "'lib' is missing" in rows[1].error


def test_batch_predict_reads_a_manifest(meta_models, meta_data, tmp_path):
    from defectscope.runtime.predict import predict

    manifest = tmp_path / "line.csv"
    table = pd.read_csv(meta_data, dtype=str)
    table["filename"] = [str(meta_data.parent / p) for p in table["filename"]]
    chosen = pd.concat([table[table["label"] == c].head(4) for c in ("GOOD", "spot_A", "spot_B")])
    chosen.loc[chosen.index[0], "lib"] = ""  # one row without its value
    chosen.to_csv(manifest, index=False)
    out = tmp_path / "out.csv"
    counts = predict(meta_models["with"], [manifest], fmt="csv", out=out, runtime="onnxruntime", precision="fp32")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 12 and counts.get("_unreadable") == 1
    assert "'lib' is missing" in rows[0]["error"]
    truth = chosen["label"].tolist()
    right = sum(r["top_class"] == t for r, t in zip(rows[1:], truth[1:], strict=True))
    assert right >= 10
    # --metadata for every image fills what the manifest lacks.
    counts = predict(meta_models["with"], [manifest], fmt="csv", out=out, metadata={"lib": "B"})
    assert "_unreadable" not in counts


def test_sorter_takes_the_values_from_the_file_name(meta_models, tmp_path):
    from defectscope.station.sorter import sort
    from defectscope.station.store import Store

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    (inbox / "B").mkdir(parents=True)
    rng = np.random.default_rng(7)
    Image.fromarray(make_image("spot", rng)).save(inbox / "lib-A_0001.png")
    Image.fromarray(make_image("spot", rng)).save(inbox / "B" / "0002.png")  # value from the folder name
    Image.fromarray(make_image("spot", rng)).save(inbox / "nolib_0003.png")
    with pytest.raises(ValueError, match=r"needs metadata inputs \(lib\)"):
        sort(meta_models["with"], inbox, out, mode="copy", settle_seconds=0, progress=False)
    with pytest.raises(ValueError, match="no named group for lib"):
        sort(meta_models["with"], inbox, out, mode="copy", settle_seconds=0, progress=False,
             metadata_pattern=r"(?P<lab>[AB])")
    summary = sort(meta_models["with"], inbox, out, mode="copy", settle_seconds=0, progress=False,
                   metadata_pattern=r"(?:lib-|^)(?P<lib>[AB])[_/]")
    assert summary["processed"] == 3
    with Store(summary["log"]) as store:
        rows = {r["file_name"]: r for r in store.rows("done")}
    assert rows["lib-A_0001.png"]["top_class"] == "spot_A"
    assert rows["0002.png"]["top_class"] == "spot_B"
    assert rows["nolib_0003.png"]["decision"] == "_unreadable"
    assert "nolib_0003.png: metadata field 'lib' is missing" in rows["nolib_0003.png"]["error"]


def test_service_requires_the_values(meta_models, tmp_path):
    import httpx
    from test_serve import config_for, running

    buf = io.BytesIO()
    Image.fromarray(make_image("spot", np.random.default_rng(4))).save(buf, format="PNG")
    png = buf.getvalue()
    with running(config_for(tmp_path, meta_models["with"])) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/readyz").json()["model"]["metadata_inputs"][0]["name"] == "lib"
        files = [("file", ("a.png", png, "image/png"))]
        r = client.post("/v1/predict", files=files)
        assert r.status_code == 422 and "'lib' is missing" in r.json()["detail"]
        r = client.post("/v1/predict", files=files, data={"lib": "C"})
        assert r.status_code == 422 and "unknown value 'C'" in r.json()["detail"]
        r = client.post("/v1/predict", files=files, data={"metadata": "{not json"})
        assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
        r = client.post("/v1/predict", files=files, data={"lib": "A", "station": "S1"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["class"] == "spot_A"
        r = client.post("/v1/predict", files=files, data={"metadata": '{"lib": "B"}'})
        assert r.status_code == 200 and r.json()["results"][0]["class"] == "spot_B"
        r = client.post("/v1/predict", content=png, params={"lib": "B"}, headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["results"][0]["class"] == "spot_B"
        r = client.post("/v1/predict", content=png, headers={"Content-Type": "image/png"})
        assert r.status_code == 422 and "lib" in r.json()["detail"]


def test_frozen_rbf_head_with_metadata_equals_the_sklearn_pipeline():
    """The folded KernelHead (metadata passing beside the kernel values) gives sklearn's logits exactly."""
    import torch
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression

    from defectscope.config import build_config
    from defectscope.models.factory import create_model
    from defectscope.training.frozen_features import fit_frozen, pooled_features

    rng = np.random.default_rng(0)
    kinds = ["GOOD", "scratch", "spot"]
    labels = np.repeat(np.arange(3), 12)
    images = np.stack([make_image(kinds[y], rng, 32) for y in labels])
    meta = np.eye(2, dtype=np.float32)[rng.integers(0, 2, len(labels))]
    cfg = build_config(overrides={"train.class_weights": False, "train.frozen_c": [1.0]})
    model = create_model("seed_cnn2", 3, image_size=32)
    model.set_metadata_dim(2)
    fit_frozen(model, cfg, images, labels, images[:0], labels[:0], kinds, metadata=meta)
    with torch.no_grad():
        got = model(torch.from_numpy(images).float().div(255).unsqueeze(1), torch.from_numpy(meta)).numpy()
    z = pooled_features(model, images)  # the fitted model's features: FeatureNorm applied
    emb = Nystroem(gamma=1.0 / z.shape[1], n_components=len(z), random_state=cfg.seed).fit(z)
    lr = LogisticRegression(C=1.0, max_iter=3000).fit(np.hstack([emb.transform(z), meta]), labels)
    np.testing.assert_allclose(got, lr.decision_function(np.hstack([emb.transform(z), meta])), atol=2e-3)
