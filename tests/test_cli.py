"""Smoke tests of the CLI verbs over one small run: each verb runs through `defectscope.cli.main` and leaves
what it promises on disk; `predict` (runtime/predict.py) also in every output format."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from defectscope.cli import main


@pytest.fixture(scope="module")
def cli_run(trained_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(trained_run, run)
    return run


@pytest.fixture(scope="module")
def exported(cli_run):
    assert main(["calibrate", str(cli_run), "--review-rate", "0.1", "--drift-rate", "0.2"]) == 0
    policy = json.loads((cli_run / "policy.json").read_text())
    assert policy["review_threshold"] is not None and policy["drift"]["score"]
    model = cli_run / "export" / "model.onnx"
    assert main(["export", str(cli_run)]) == 0  # --out defaults to RUN/export/model.onnx
    assert model.is_file() and model.with_suffix(".json").is_file()
    return model


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_predict_writes_one_row_per_image_in_each_format(exported, folder_dataset, tmp_path, fmt):
    out = tmp_path / f"results.{fmt}"
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = main(["predict", str(exported), str(folder_dataset / "GOOD"), str(bad), "--format", fmt, "--out", str(out)])
    assert code == 1  # an unreadable image is reported by the exit code, the rest is still written
    n_images = len(list((folder_dataset / "GOOD").glob("*.png"))) + 1
    if fmt == "csv":
        rows = list(csv.DictReader(out.open()))
        decisions = [r["decision"] for r in rows]
    elif fmt == "json":
        rows = json.loads(out.read_text())
        decisions = [r["decision"] for r in rows]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        decisions = [r["decision"] for r in rows]
    assert len(rows) == n_images
    assert decisions.count("_unreadable") == 1


def test_predict_missing_input_is_a_one_line_error(exported, tmp_path, capsys):
    assert main(["predict", str(exported), str(tmp_path / "nope.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_predict_on_training_weights_says_what_to_pass(cli_run, folder_dataset, capsys):
    weights = cli_run / "model.safetensors"
    assert main(["predict", str(weights), str(folder_dataset / "GOOD")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"defectscope: error: {weights} is training weights, not an exported model (.onnx); run "
        f"`defectscope export {cli_run}` and pass the .onnx file"]


def test_predict_on_a_run_not_yet_exported_says_export_it_first(trained_run, folder_dataset, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    assert main(["predict", str(run), str(folder_dataset / "GOOD")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"defectscope: error: {run} is a training run, not an exported model; export it first: "
                           f"`defectscope export {run}` (writes {run / 'export' / 'model.onnx'})")


def test_predict_on_an_exported_run_uses_its_export(cli_run, exported, folder_dataset, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert main(["predict", str(cli_run), str(folder_dataset / "GOOD"), "--format", "jsonl", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == len(list((folder_dataset / "GOOD").glob("*.png")))


def test_sort_then_log_export(exported, folder_dataset, tmp_path):
    inbox = tmp_path / "inbox"
    shutil.copytree(folder_dataset / "spot", inbox)
    n = len(list(inbox.glob("*.png")))
    out = tmp_path / "sorted"
    assert main(["sort", str(exported), "--inbox", str(inbox), "--out", str(out), "--copy", "--settle", "0"]) == 0
    filed = [p for p in out.rglob("*.png")]
    assert len(filed) == n and len(list(inbox.glob("*.png"))) == n  # copy mode leaves the inbox as is
    log_csv = tmp_path / "log.csv"
    assert main(["log", "export", str(out / "results.db"), "--out", str(log_csv)]) == 0
    rows = list(csv.DictReader(log_csv.open()))
    assert len(rows) == n and {r["status"] for r in rows} == {"done"}


def test_sort_takes_a_run_folder_as_predict_does(cli_run, exported, folder_dataset, tmp_path, capsys):
    """README: `predict RUN` uses RUN/export/model.onnx; `sort RUN` did say "no such model file"."""
    inbox = tmp_path / "inbox"
    shutil.copytree(folder_dataset / "spot", inbox)
    out = tmp_path / "sorted"
    assert main(["sort", str(cli_run), "--inbox", str(inbox), "--out", str(out), "--copy", "--settle", "0"]) == 0
    assert len(list(out.rglob("*.png"))) == len(list(inbox.glob("*.png")))
    assert f"its export {exported}" in capsys.readouterr().err
    weights = cli_run / "model.safetensors"
    assert main(["sort", str(weights), "--inbox", str(inbox), "--out", str(tmp_path / "s2")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line == (f"defectscope: error: {weights} is training weights, not an exported model (.onnx); run "
                    f"`defectscope export {cli_run}` and pass the .onnx file")
    bare = shutil.copytree(cli_run, tmp_path / "bare", ignore=shutil.ignore_patterns("export"))
    assert main(["sort", str(bare), "--inbox", str(inbox), "--out", str(tmp_path / "s3")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert f"{bare} is a training run, not an exported model; export it first" in line
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists()  # refused before anything is made


def test_calibrate_states_the_drift_line_on_the_drift_score_scale(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert main(["calibrate", str(run), "--review-rate", "0.1", "--drift-rate", "0.2"]) == 0
    threshold = json.loads((run / "policy.json").read_text())["drift_threshold"]
    err = capsys.readouterr().err
    line, = [x for x in err.splitlines() if x.startswith("Drift: ")]
    assert "drift_score > 1.00" in line and "relative to the line" in line
    assert f"{threshold:.6g}" not in err and f"{threshold:.4g}" not in err  # the raw line reaches no person


def test_drift_eval_writes_its_json(cli_run):
    assert main(["drift-eval", str(cli_run), "--kinds", "far"]) == 0
    result = json.loads((cli_run / "drift_eval.json").read_text())
    assert set(result["kinds"]) == {"far"} and result["best_score"] in result["scores"]


def test_evaluate_after_calibrate_reports_the_policy(cli_run, exported):
    assert main(["evaluate", str(cli_run), "--no-report"]) == 0
    metrics = json.loads((cli_run / "evaluation" / "metrics.json").read_text())
    assert "policy" in metrics and metrics["policy"]["n"] > 0


def test_predict_prints_a_table_a_person_reads(exported, folder_dataset, tmp_path, capsys):
    out = tmp_path / "rows.txt"
    good = sorted((folder_dataset / "GOOD").glob("*.png"))[:3]
    assert main(["predict", str(exported), *map(str, good), "--format", "table", "--out", str(out)]) == 0
    head, *lines = out.read_text().splitlines()
    assert head.split() == ["image", "decision", "reason", "confidence", "drift"]
    assert len(lines) == 3 and all(line.startswith(p.name) for line, p in zip(lines, good, strict=True))
    assert capsys.readouterr().err.strip().startswith("3 images: ")


def test_predict_csv_says_why_and_reads_drift_against_its_line(exported, folder_dataset, tmp_path):
    out = tmp_path / "rows.csv"
    assert main(["predict", str(exported), str(folder_dataset / "spot"), "--out", str(out)]) == 0  # csv by suffix
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:6] == ["image", "decision", "reason", "verdict", "confidence", "top_class"]
    threshold = json.loads((exported.parent.parent / "policy.json").read_text())["drift_threshold"]
    for r in rows:
        assert r["reason"]
        assert (r["decision"] == "Drift") == (float(r["drift_score"]) > 1.0)
        assert (r["confidence"] == "") == (r["decision"] in ("REVIEW", "Drift"))
    assert threshold > 0


def test_predict_format_follows_the_terminal_and_the_out_suffix():
    from defectscope.runtime.predict import default_format

    assert default_format(None, True) == "table" and default_format(None, False) == "jsonl"
    assert default_format("x.csv", True) == "csv" and default_format("x.json", False) == "json"
    assert default_format("x.out", True) == "jsonl"
