"""Ensembles: finished runs on one split -> one run averaging their probabilities, exported as one graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FAST

from defectscope import calibrate, ensemble, evaluate, export, train
from defectscope.config import ConfigError, build_config
from defectscope.models.ensemble import AveragedHeads, MemberFeatures
from defectscope.models.inference import predict_logits
from defectscope.rundir import Run
from defectscope.runtime.predictor import Predictor
from defectscope.training.ensemble import EnsembleError

SYMMETRIC = {"augment.hflip": True, "augment.vflip": True, "augment.rot90": True}


@pytest.fixture(scope="module")
def members(folder_dataset, tmp_path_factory):
    """Two fine-tunes differing only in their init seed, and a frozen-feature run with 8 test-time views."""
    root = tmp_path_factory.mktemp("members")
    a = train(folder_dataset, root / "a", **{**FAST, "train.epochs": 2})
    b = train(folder_dataset, root / "b", **{**FAST, "train.epochs": 2, "train.init_seed": 7})
    c = train(folder_dataset, root / "c", **{**FAST, **SYMMETRIC, "train.recipe": "frozen", "train.frozen_c": [1.0]})
    return [a, b, c]


@pytest.fixture(scope="module")
def ensembled(members, tmp_path_factory):
    return ensemble(members, tmp_path_factory.mktemp("ens") / "run")


def _probabilities(model, images) -> np.ndarray:
    return torch.softmax(predict_logits(model, images), 1).numpy()


def test_init_seed_keeps_the_split_and_changes_the_weights(members):
    a, b = Run(members[0]), Run(members[1])
    assert a.spec["dataset_sha256"] == b.spec["dataset_sha256"]
    assert (a.table["split"] == b.table["split"]).all()
    wa, wb = a.model().state_dict(), b.model().state_dict()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if wa[k].is_floating_point())


def test_init_seed_must_be_an_integer():
    with pytest.raises(ConfigError, match="train.init_seed"):
        build_config(overrides={"train.init_seed": "7"})
    assert build_config(overrides={"train.init_seed": 7, "seed": 3}).training_seed == 7
    assert build_config(overrides={"seed": 3}).training_seed == 3


def test_ensemble_averages_the_members_probabilities(members, ensembled):
    run = Run(ensembled)
    _, images = run.images(run.rows("test"))
    model = run.model()  # rebuilt from model.json + model.safetensors: the spec round-trips
    assert isinstance(model.backbone, MemberFeatures) and isinstance(model.head, AveragedHeads)
    want = np.mean([_probabilities(Run(m).model(), images) for m in members], axis=0)
    np.testing.assert_allclose(_probabilities(model, images), want, atol=1e-5)
    # the energy Drift score (-logsumexp of the logits) is the members' mean energy, not a constant
    energy = -torch.logsumexp(predict_logits(model, images), 1).numpy()
    members_energy = np.mean([-torch.logsumexp(predict_logits(Run(m).model(), images), 1).numpy()
                              for m in members], axis=0)
    np.testing.assert_allclose(energy, members_energy, atol=1e-4)
    assert energy.std() > 1e-3
    # the frozen member keeps its own views and feature transform inside the ensemble
    assert model.backbone.members[2].views == tuple(range(8))


def test_ensemble_run_records_members_and_validation(members, ensembled):
    spec = json.loads((ensembled / "model.json").read_text())
    assert spec["architecture"] == "ensemble" and spec["recipe"] == "ensemble"
    assert [m["recipe"] for m in spec["members"]] == ["finetune", "finetune", "frozen"]
    val = spec["ensemble_val"]
    assert val["images"] > 0 and len(val["members"]) == 3
    assert 0.0 <= val["ensemble"]["macro_f1"] <= 1.0 and spec["best_score"] == val["ensemble"]["macro_f1"]
    assert (ensembled / "dataset.csv").read_text() == (members[0] / "dataset.csv").read_text()


def test_ensemble_calibrates_evaluates_and_exports_as_one_graph(ensembled, tmp_path):
    import shutil

    run = shutil.copytree(ensembled, tmp_path / "run")
    metrics = evaluate(run)
    assert metrics["accuracy"] > 0.6  # chance is 1/3
    calibrate(run, review_rate=0.2)
    out = tmp_path / "ensemble.onnx"
    report = export(run, out, int8=False, select=False)  # raises unless ONNX matches torch within 1e-4
    assert report["parity"]["max_abs_diff_probabilities"] <= 1e-4
    _, images = Run(run).images(Run(run).rows("test"))
    predictions = Predictor(out).predict_batch(list(images[:8]))  # the torch-free line runtime
    got = np.array([[p.probabilities[c] for c in Run(run).classes] for p in predictions])
    np.testing.assert_allclose(got, _probabilities(Run(run).model(), images[:8]), atol=1e-4)
    assert all(p.decision for p in predictions)


def test_members_on_another_split_are_refused(members, folder_dataset, tmp_path):
    other = train(folder_dataset, tmp_path / "other", **{**FAST, "train.epochs": 1, "seed": 3})
    with pytest.raises(EnsembleError, match="same images, labels and split"):
        ensemble([members[0], other], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bad_ensembles_say_what_is_wrong(members, ensembled, folder_dataset, tmp_path):
    with pytest.raises(EnsembleError, match="at least two"):
        ensemble(members[:1], tmp_path / "one")
    with pytest.raises(EnsembleError, match="given twice"):
        ensemble([members[0], members[0]], tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    with pytest.raises(EnsembleError, match="already holds a run"):
        ensemble(members, ensembled)
    with pytest.raises(EnsembleError, match="itself an ensemble"):
        ensemble([members[0], ensembled], tmp_path / "nested")
    bigger = train(folder_dataset, tmp_path / "big", **{**FAST, "train.epochs": 1, "model.image_size": 40})
    with pytest.raises(EnsembleError, match="input size"):
        ensemble([members[0], bigger], tmp_path / "sizes")


def test_cli_ensemble(members, tmp_path, capsys):
    from defectscope.cli import main

    assert main(["ensemble", str(members[0]), str(members[1]), "--out", str(tmp_path / "cli")]) == 0
    assert "ensemble of 2 runs" in capsys.readouterr().out
    assert Run(tmp_path / "cli").spec["member_runs"] == [str(members[0]), str(members[1])]
