"""What the CLI prints: each line once, and progress lines in a log that is not a terminal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import write_folder_dataset

from defectscope.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _all_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    return [line for line in (captured.out + captured.err).splitlines() if line.strip()]


def _printed_once(lines: list[str], fragment: str) -> None:
    hits = [line for line in lines if fragment in line]
    assert len(hits) == 1, hits


def test_evaluate_says_where_its_report_is_once(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert main(["evaluate", str(run)]) == 0
    lines = _all_lines(capsys)
    _printed_once(lines, "report.html")
    assert len(lines) == len(set(lines)), lines


def test_export_states_its_runtime_choice_once(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert main(["export", str(run)]) == 0
    lines = _all_lines(capsys)
    _printed_once(lines, "onnxruntime_fp32 ")
    assert len(lines) == len(set(lines)), lines


def test_audit_prints_each_finding_once(tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "data", per_class=8)
    assert main(["audit", str(data), "--out", str(tmp_path / "audit"), "--features", "pixels"]) == 0
    lines = _all_lines(capsys)
    _printed_once(lines, "files readable")
    assert len(lines) == len(set(lines)), lines


def test_a_piped_training_log_gets_progress_lines(tmp_path):
    data = write_folder_dataset(tmp_path / "data", per_class=12)
    env = {**os.environ, "PYTHONPATH": SRC, "DEFECTSCOPE_PROGRESS_SECONDS": "0"}
    done = subprocess.run([sys.executable, "-m", "defectscope", "train", "--data", str(data), "--out",
                           str(tmp_path / "run"), "--recipe", "finetune", "--model", "seed_cnn2", "--image-size", "32",
                           "--epochs", "1", "--batch-size", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr  # no bar redraws in a log
    epoch = [line for line in done.stderr.splitlines() if line.startswith("epoch 1: ") and "batch" in line]
    assert len(epoch) >= 5 and "about" in epoch[0] and "s left" in epoch[0], done.stderr
    assert any(line.startswith("decode+resize: ") for line in done.stderr.splitlines()), done.stderr


def test_a_piped_frozen_training_log_shows_the_feature_extraction(tmp_path):
    """The frozen recipe spends its time extracting features (minutes in the demo): a piped log says so."""
    data = write_folder_dataset(tmp_path / "data", per_class=12)
    env = {**os.environ, "PYTHONPATH": SRC, "DEFECTSCOPE_PROGRESS_SECONDS": "0"}
    done = subprocess.run([sys.executable, "-m", "defectscope", "train", "--data", str(data), "--out",
                           str(tmp_path / "run"), "--recipe", "frozen", "--model", "seed_cnn2", "--image-size", "32",
                           "--batch-size", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    train_lines = [x for x in lines if x.startswith("frozen features (training images): ")]
    assert len(train_lines) >= 3 and "images (" in train_lines[0] and "s left" in train_lines[0], done.stderr
    assert any(x.startswith("frozen features (validation images): ") for x in lines), done.stderr
    # The library caller (no CLI) stays silent: progress is the CLI's choice.
    from defectscope import progress
    from defectscope.models.factory import create_model
    from defectscope.training.frozen_features import pooled_features

    before = progress._bar_factory  # in-process CLI tests may have chosen lines already
    try:
        progress.use_bars(False)  # what a library caller has
        model = create_model("seed_cnn2", num_classes=2, image_size=32)
        assert pooled_features(model, np.zeros((5, 32, 32), np.uint8), batch_size=2).shape[0] == 5
    finally:
        progress._bar_factory = before


def test_progress_lines_are_rate_limited():
    from defectscope import progress

    try:
        progress.use_lines(3600)
        bar = progress.progress(range(1000), desc="loop", unit="img")
        assert sum(1 for _ in bar) == 1000 and bar.n == 1000  # a quick loop: no line within the interval
        assert bar.line(10.0).startswith("loop: 1000/1000 img (100%)")
    finally:
        progress.use_bars(False)
